"""Pre- and post-processing for running exported models outside Ultralytics (OpenVINO, ONNX Runtime, TFLite).

The exported graph takes ``(1, 3, imgsz, imgsz)`` float32 RGB in [0, 1], letterboxed like Ultralytics' validator,
and returns ``(1, 4 + nc, anchors)``: xywh boxes in input pixels followed by class scores.
"""

from __future__ import annotations

import numpy as np


def preprocess_image(image_bgr: np.ndarray, imgsz: int = 640) -> np.ndarray:
    """Letterbox a BGR image (as ``cv2.imread`` returns it) to the export's input.

    Args:
        image_bgr: HxWx3 uint8 BGR image.
        imgsz: The export's square input size (stored as ``imgsz`` in its metadata).

    Returns:
        ``(1, 3, imgsz, imgsz)`` float32 RGB array in [0, 1].
    """
    from ultralytics.data.augment import LetterBox  # deferred: Ultralytics starts after prepare_environment()

    if image_bgr is None or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError("preprocess_image expects an HxWx3 BGR image (cv2.imread returns None for unreadable files)")
    boxed = LetterBox((imgsz, imgsz), auto=False)(image=image_bgr)
    chw = np.ascontiguousarray(boxed[..., ::-1].transpose(2, 0, 1))
    return (chw[None].astype(np.float32) / 255.0)


def postprocess(output: np.ndarray, image_shape: tuple[int, int], imgsz: int = 640, conf: float = 0.25,
                iou: float = 0.7) -> np.ndarray:
    """NMS (Ultralytics' own) and boxes mapped back to the original image.

    Args:
        output: Raw export output ``(1, 4 + nc, anchors)``.
        image_shape: (height, width) of the original image.
        imgsz: The export's input size.
        conf: Score threshold.
        iou: NMS IoU threshold.

    Returns:
        ``(n, 6)`` array: x1, y1, x2, y2 (original-image pixels), score, class index.
    """
    # deferred: torch and Ultralytics are only needed here, and Ultralytics starts after prepare_environment()
    import torch
    from ultralytics.utils import ops
    from ultralytics.utils.nms import non_max_suppression

    det = non_max_suppression(torch.from_numpy(np.asarray(output, dtype=np.float32)), conf, iou)[0]
    if len(det):
        det[:, :4] = ops.scale_boxes((imgsz, imgsz), det[:, :4], image_shape)
    return det.numpy()
