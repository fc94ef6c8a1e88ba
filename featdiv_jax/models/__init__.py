"""SE-ResNet backbones, the multi-head network and timm weight import (no TensorFlow here)."""

from featdiv_jax.models.multihead import (CLASSIFIERS, FROZEN_BN, FUSIONS, HEADS_IMPLS,
                                          MultiHeadNet, create_multihead, extract_head, fuse,
                                          place_head)
from featdiv_jax.models.resnet import (ARCHS, CONV_IMPLS, DTYPES, STEMS, BasicBlock, BatchNorm,
                                       Bottleneck, DropPath, SEResNet, backbone_fields,
                                       create_model, default_dtype, drop_path_rates,
                                       se_reduced_width)
from featdiv_jax.models.timm_import import load_timm_weights, read_state_dict

__all__ = [
    "ARCHS", "CLASSIFIERS", "CONV_IMPLS", "DTYPES", "FROZEN_BN", "FUSIONS", "HEADS_IMPLS", "STEMS",
    "BasicBlock", "BatchNorm", "Bottleneck", "DropPath", "MultiHeadNet", "SEResNet",
    "backbone_fields", "create_model", "create_multihead", "default_dtype", "drop_path_rates",
    "extract_head", "fuse", "load_timm_weights", "place_head", "read_state_dict",
    "se_reduced_width",
]
