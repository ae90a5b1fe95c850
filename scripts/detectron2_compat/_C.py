"""Pure-Python stand-in for detectron2's compiled extension `detectron2._C`.

Installed by densecl's scripts/install_detectron2.sh because the registry's detectron2 sdist
(pb1-detectron2==0.6) ships without the C++ sources. detectron2 imports `_C` at import time from
`layers/deform_conv.py`, `layers/rotated_boxes.py` and `layers/roi_align_rotated.py`; the models this
project trains (Faster R-CNN C4, Mask R-CNN FPN, FCN) use torchvision's ROIAlign and NMS instead, so only
the import has to succeed. Every op that really needs the extension raises `UnsupportedOpError` naming the
op and the way out (install the official build, see docs/detectron2.md).
"""

import torch

# The installer compares this with the copy in scripts/detectron2_compat/ to decide whether to rebuild.
DENSECL_STANDIN = True
DENSECL_PATCH_LEVEL = 1

_HOW_TO_FIX = (
    "this detectron2 was installed by densecl's scripts/install_detectron2.sh from the registry sdist "
    "pb1-detectron2==0.6, which lacks the compiled extension detectron2._C. Install the official build "
    "(see docs/detectron2.md: pip install 'git+https://github.com/facebookresearch/detectron2.git') "
    "to use it."
)


class UnsupportedOpError(NotImplementedError):
    """Raised by every op of the compiled extension that this stand-in cannot provide."""


def _unsupported(feature: str, name: str, hint: str = ""):
    def op(*args, **kwargs):
        raise UnsupportedOpError(f"detectron2._C.{name} ({feature}) is not available: {_HOW_TO_FIX}{hint}")

    op.__name__ = name
    op.__qualname__ = name
    op.__doc__ = f"Unavailable in the stand-in: {feature}."
    return op


_ROTATED = "rotated boxes"
_DEFORM = "deformable convolution"
_FAST_EVAL = "fast COCOeval"
_FAST_EVAL_HINT = " Or pass use_fast_impl=False to COCOEvaluator to use pycocotools' COCOeval."

box_iou_rotated = _unsupported(_ROTATED, "box_iou_rotated")
nms_rotated = _unsupported(_ROTATED, "nms_rotated")
roi_align_rotated_forward = _unsupported(_ROTATED, "roi_align_rotated_forward")
roi_align_rotated_backward = _unsupported(_ROTATED, "roi_align_rotated_backward")
deform_conv_forward = _unsupported(_DEFORM, "deform_conv_forward")
deform_conv_backward_input = _unsupported(_DEFORM, "deform_conv_backward_input")
deform_conv_backward_filter = _unsupported(_DEFORM, "deform_conv_backward_filter")
modulated_deform_conv_forward = _unsupported(_DEFORM, "modulated_deform_conv_forward")
modulated_deform_conv_backward = _unsupported(_DEFORM, "modulated_deform_conv_backward")
InstanceAnnotation = _unsupported(_FAST_EVAL, "InstanceAnnotation", _FAST_EVAL_HINT)
ImageEvaluation = _unsupported(_FAST_EVAL, "ImageEvaluation", _FAST_EVAL_HINT)
COCOevalEvaluateImages = _unsupported(_FAST_EVAL, "COCOevalEvaluateImages", _FAST_EVAL_HINT)
COCOevalAccumulate = _unsupported(_FAST_EVAL, "COCOevalAccumulate", _FAST_EVAL_HINT)


# detectron2.layers.nms.nms_rotated calls torch.ops.detectron2.nms_rotated, which the real extension
# registers: register it too, so the call fails with the message above instead of an opaque AttributeError.
_OPS = torch.library.Library("detectron2", "FRAGMENT")
_OPS.define("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor")
_OPS.impl("nms_rotated", lambda boxes, scores, iou_threshold: nms_rotated(), "CompositeExplicitAutograd")


def get_compiler_version() -> str:
    """Used by detectron2.utils.collect_env: nothing was compiled."""
    return "none (densecl pure-Python stand-in for detectron2._C)"


def get_cuda_version() -> str:
    """Used by detectron2.utils.collect_env: no CUDA kernels were built."""
    return "none (densecl pure-Python stand-in for detectron2._C)"


def has_cuda() -> bool:
    """No CUDA kernels here; detectron2's GPU paths for the supported models go through torchvision."""
    return False


def __getattr__(name: str):
    # AttributeError keeps hasattr() truthful; the message says why the attribute is missing.
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"detectron2._C has no attribute {name!r}: {_HOW_TO_FIX}")
