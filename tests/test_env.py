"""Offline runtime: env vars, fonts, ultralytics settings, OpenVINO opt-out, and the socket guard itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

from src import env
from src.env import FONT_NAMES, REPO_ROOT, prepare_environment

DEJAVU = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


@pytest.fixture
def fresh_env(tmp_path, monkeypatch):
    """A private config dir and home, so the test sees first-run behaviour and leaves no trace."""
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(env, "_prepared_dir", None)
    return tmp_path


def test_sets_offline_variables_and_fonts(fresh_env, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "0")  # a user cannot switch offline mode off
    config_dir = prepare_environment()
    assert config_dir == fresh_env / "cfg" / "Ultralytics"
    assert os.environ["YOLO_OFFLINE"] == "1"
    assert os.environ["YOLO_AUTOINSTALL"].lower() == "false"
    for name in FONT_NAMES:
        assert (config_dir / name).read_bytes() == DEJAVU.read_bytes()


def test_user_autoinstall_choice_is_kept(fresh_env, monkeypatch):
    monkeypatch.setenv("YOLO_AUTOINSTALL", "True")
    prepare_environment()
    assert os.environ["YOLO_AUTOINSTALL"] == "True"


def test_fresh_settings_disable_sync_and_use_repo_folders(fresh_env):
    settings = json.loads((prepare_environment() / "settings.json").read_text())
    assert settings["sync"] is False
    assert not any(settings[k] for k in ("clearml", "comet", "dvc", "mlflow", "raytune", "wandb"))
    assert settings["datasets_dir"] == str(REPO_ROOT / "dataset")
    assert settings["weights_dir"] == str(REPO_ROOT / "models" / "pretrained")
    assert settings["settings_version"] == env.SETTINGS_VERSION


def test_existing_settings_keep_user_values_but_lose_sync(fresh_env):
    config_dir = fresh_env / "cfg" / "Ultralytics"
    config_dir.mkdir(parents=True)
    (config_dir / "settings.json").write_text(json.dumps({"sync": True, "runs_dir": "/my/runs", "mlflow": True}))
    settings = json.loads((prepare_environment() / "settings.json").read_text())
    assert settings == {"sync": False, "runs_dir": "/my/runs", **env.FORCED_SETTINGS}


def test_idempotent_no_rewrites(fresh_env, monkeypatch):
    config_dir = prepare_environment()
    stamps = {p.name: p.stat().st_mtime_ns for p in config_dir.iterdir()}
    monkeypatch.setattr(env, "_prepared_dir", None)  # force the full path, not the cached early return
    assert prepare_environment() == config_dir
    assert {p.name: p.stat().st_mtime_ns for p in config_dir.iterdir()} == stamps


def test_unwritable_config_dir_is_a_clear_error(fresh_env, monkeypatch):
    blocker = fresh_env / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(blocker))
    with pytest.raises(env.EnvironmentSetupError, match="YOLO_CONFIG_DIR=.*not a writable directory"):
        prepare_environment()


@pytest.mark.parametrize("previous", [None, "1", "garbage"])
def test_openvino_telemetry_opted_out(fresh_env, previous):
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

    consent = fresh_env / "home" / "intel" / "openvino_telemetry"
    if previous is not None:
        consent.parent.mkdir()
        consent.write_text(previous)
    prepare_environment()
    assert consent.read_text() == "0"
    assert OptInChecker().check(enable_opt_in_dialog=False) == ConsentCheckResult.DECLINED


def test_importing_env_and_data_modules_does_not_import_ultralytics():
    code = "import sys, src.env, src.data.resolve, src.data.synthetic; print('ultralytics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ultralytics_import_makes_no_lookups_after_prepare(tmp_path):
    """Without YOLO_OFFLINE ultralytics resolves one.one.one.one at import; prepared, it must not look anything up."""
    code = f"""
import json, socket
from src.env import prepare_environment
config_dir = prepare_environment()
calls = []
real = socket.getaddrinfo
def spy(host, *a, **k):
    calls.append(host)
    return real(host, *a, **k)
socket.getaddrinfo = spy
import ultralytics.utils as u
from ultralytics.utils.checks import check_font
print(json.dumps({{"calls": calls, "online": u.ONLINE, "sync": u.SETTINGS["sync"],
    "config": str(u.USER_CONFIG_DIR), "expected": str(config_dir), "font": str(check_font("Arial.ttf"))}}))
"""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    clean["YOLO_CONFIG_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=clean, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["calls"] == []
    assert result["online"] is False and result["sync"] is False
    assert result["config"] == result["expected"] == str(tmp_path / "Ultralytics")
    assert result["font"] == str(tmp_path / "Ultralytics" / "Arial.ttf")


def test_socket_guard_blocks_and_records_outbound(socket_guard):
    with pytest.raises(OSError, match="blocked by socket_guard"):
        socket.create_connection(("203.0.113.7", 80), timeout=0.1)
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("github.com", 443)
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(OSError, match="blocked"):
        raw.connect(("198.51.100.1", 443))
    raw.close()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(OSError, match="blocked"):
        udp.sendto(b"x", ("192.0.2.1", 53))
    udp.close()
    assert len(socket_guard.attempts) == 4
    with pytest.raises(AssertionError, match="4 outbound network attempt"):
        socket_guard.assert_no_attempts()
    socket_guard.attempts.clear()  # the attempts above were the point of this test


def test_socket_guard_allows_loopback(socket_guard):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=2)
    peer, _ = server.accept()
    client.sendall(b"ping")
    assert peer.recv(4) == b"ping"
    for s in (client, peer, server):
        s.close()
    assert socket.getaddrinfo("localhost", 80)
    assert socket_guard.attempts == []
