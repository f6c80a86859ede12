"""README is the tutorial: every shell and Python block in it runs, on the tiny synthetic set.

Blocks run in a sandbox that looks like a checkout (code linked, fresh models/ and dataset/). Commands are shrunk,
not changed in meaning: datasets point at the tiny set, FP32 checkpoints at a tiny model saved in
models/pretrained/, and training runs get 64 px images, batch 4, 1 epoch, CPU. Blocks that cannot run here are
listed in SKIPPED with the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# block name (the heading above it + its index under that heading) -> why it does not run here
SKIPPED = {
    "Quick start #1": "make test / make demo: the whole suite itself and a 3.5-minute demo (after install)",
    "Against Ultralytics' own INT8 paths #1": "make bench / compare.py need requirements-bench.txt (nncf, ModelOpt), "
                                              "which make test does not install; tests/test_compare.py covers it",
    "Against Ultralytics' own INT8 paths #2": "the 51-minute benchmark run whose numbers the table quotes",
    "On data where 8-bit is not free: the photo set and a real checkpoint #1": "the photo set (1300 images) and the "
        "hour-long harness run whose numbers the table quotes; tests/test_photo_sets.py makes the set small",
    "On data where 8-bit is not free: the photo set and a real checkpoint #2": "the 640 px real-checkpoint harness run "
        "(needs requirements-bench.txt); tests/test_real_checkpoint.py runs the same pipeline at 320 px",
    "Troubleshooting #1": "resumes a run that stopped on CUDA out of memory (tests/test_reliability.py makes one)",
    "Visualizing training progress #1": "its tensorboard line starts a server that runs until stopped (the training "
                                        "line is the Basic usage command with --log-dir)",
}


def readme_blocks() -> list[tuple[str, str, str]]:
    """(name, language, code) for every fenced bash/python block of README.md."""
    blocks, heading, count = [], "top", {}
    lines = (REPO / "README.md").read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        m = re.match(r"^```(bash|python)\s*$", line)
        if m:
            body = []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            count[heading] = count.get(heading, 0) + 1
            blocks.append((f"{heading} #{count[heading]}", m.group(1), "\n".join(body)))
        i += 1
    return blocks


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_dataset):
    """A checkout-like folder: code linked, a tiny FP32 model under the names README uses, the tiny dataset."""
    import cv2
    import torch
    from ultralytics.nn.tasks import DetectionModel

    root = tmp_path_factory.mktemp("readme")
    for name in ("train_qat.py", "validate_exports.py", "src", "configs", "scripts", "benchmarks", "docs"):
        (root / name).symlink_to(REPO / name)
    pre = root / "models" / "pretrained"
    pre.mkdir(parents=True)
    torch.manual_seed(0)
    import yaml

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.names = dict(enumerate(yaml.safe_load(Path(tiny_dataset).read_text())["names"]))
    fp32 = {"model": model.half(), "train_args": {}}
    for name in ("yolov8n.pt", "yolov8s.pt", "yolov8m.pt", "yolov8n_shapes.pt"):  # stand-ins with the same classes
        torch.save(fp32, pre / name)
    (root / "models" / "custom_trained").mkdir()
    torch.save(fp32, root / "models" / "custom_trained" / "custom_yolov8.pt")
    img = next((Path(tiny_dataset).parent / "images" / "val").glob("*"))
    for name in ("sample.jpg", "image.jpg"):
        cv2.imwrite(str(root / name), cv2.imread(str(img)))
    return root


DATA_NAMES = ("coco.yaml", "dataset/custom_dataset.yaml", "dataset/shapes/data.yaml")


def shrink_command(argv: list[str], data: str) -> list[str] | None:
    """Rewrite one README command for the tiny set; None when it is not a command this test runs."""
    if not argv:
        return None
    out = [data if a in DATA_NAMES else a for a in argv]
    if out[0] == "python" and len(out) > 1:
        out[0] = sys.executable
        if out[1] == "-u":  # unbuffered output changes nothing here
            del out[1]
    script = out[1] if len(out) > 1 else ""

    def setopt(flag, value):
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out.extend([flag, value])

    if script == "train_qat.py" and "--resume" not in out:
        for flag, value in (("--img-size", "64"), ("--batch-size", "4"), ("--workers", "0"), ("--device", "cpu")):
            setopt(flag, value)
        if "--epochs" in out:
            setopt("--epochs", "1")
        if "--export" in out or "--validate-exports" in out:
            out.append("--exist-ok")
    elif script == "scripts/train_fp32.py":
        setopt("--epochs", "1")
        setopt("--imgsz", "64")
        setopt("--batch", "4")
        setopt("--workers", "0")
        setopt("--out", "models/pretrained/readme_fp32.pt")
    elif script == "-m" and out[2] == "src.data.synthetic":
        setopt("--train", "4")
        setopt("--val", "2")
        setopt("--imgsz", "64")
        setopt("--out", "dataset/readme_shapes")
    elif script == "benchmarks/overhead.py":
        setopt("--batch", "2")
        setopt("--imgsz", "64")
        setopt("--steps", "1")
    elif script == "validate_exports.py":
        setopt("--runs", "2")
        setopt("--warmup", "1")
    return out


def _commands(code: str) -> list[str]:
    """Shell lines with continuations joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


BLOCKS = readme_blocks()


def test_readme_has_the_promised_blocks():
    names = [b[0] for b in BLOCKS]
    assert any(code.strip().startswith("make test") for _, _, code in BLOCKS)
    assert all(name in names for name in SKIPPED), set(SKIPPED) - set(names)


@pytest.mark.parametrize("name,lang,code", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_readme_block_runs(name, lang, code, sandbox, tiny_dataset):
    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    env = {**os.environ, "PYTHONPATH": str(sandbox)}
    if lang == "python":
        r = subprocess.run([sys.executable, "-c", code], cwd=sandbox, capture_output=True, text=True, timeout=600,
                           env=env)
        assert r.returncode == 0, f"{name}:\n{code}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return
    for line in _commands(code):
        argv = shrink_command(shlex.split(line.split(" #")[0]), str(tiny_dataset))
        r = subprocess.run(argv, cwd=sandbox, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, f"{name}: {' '.join(argv)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
