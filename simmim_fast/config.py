"""The configuration schema: every section, key, type, default, help text and cross-key check.

A config is one JSON file with the sections below. Loading it (``load_config``) goes through the
generic typed loader (``simmim_fast.typed_config``), which checks every key and value and raises
``ConfigError`` naming the key, the value and the file; docs/CONFIG.md is generated from the help
texts (``simmim-fast config-docs``).

    cfg = load_config("configs/swin_b.json", overrides=["train.base_lr=2e-4"])
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from .typed_config import ConfigError, apply_overrides, check_positive, config_error, config_to_dict, load_typed

__all__ = [
    "Config", "ModelConfig", "MaskConfig", "DataConfig", "TrainConfig", "EngineConfig", "CheckpointConfig",
    "LoggingConfig", "ProbeConfig", "WandbConfig", "MlflowConfig", "FinetuneConfig", "ConfigError", "load_config", "config_to_dict", "apply_overrides",
]


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


_err = config_error


def _positive(obj: Any, *names: str) -> None:
    check_positive(_section_name(obj), obj, *names)


def _section_name(obj: Any) -> str:
    for f in dataclasses.fields(Config):
        if f.type == type(obj).__name__ or getattr(f.type, "__name__", None) == type(obj).__name__:
            return f.name
    return type(obj).__name__


@dataclass
class ModelConfig:
    encoder: Literal["swin", "swinv2", "vit"] = _f(
        "swin", "Encoder family: 'swin' (timm SwinTransformer), 'swinv2' (timm SwinTransformerV2: res-post-norm, "
                "scaled cosine attention, log-spaced continuous position bias) or 'vit' (timm Beit-style ViT: "
                "shared relative position bias, layer scale, no absolute position embedding).")
    img_size: int = _f(192, "Input image size in pixels (square).")
    patch_size: int = _f(4, "Model patch size in pixels (4 for Swin, 16 for ViT-B/16). Also the encoder's "
                            "token stride at the first stage.")
    in_chans: int = _f(3, "Input channels.")
    embed_dim: int = _f(128, "Embedding width of the first stage (Swin) or of every block (ViT).")
    depths: List[int] = _f([2, 2, 18, 2], "Blocks per stage (Swin); for ViT a single entry, the number of blocks.")
    num_heads: List[int] = _f([4, 8, 16, 32], "Attention heads per stage (Swin); for ViT a single entry.")
    window_size: int = _f(6, "Swin attention window (6 for Swin-B, 12 for Swin-L at 192 px). Stages whose map "
                             "is not larger than the window use the whole map and no shift. Ignored for ViT.")
    mlp_ratio: float = _f(4.0, "MLP hidden width / embedding width.")
    drop_path_rate: float = _f(0.0, "Stochastic depth rate (0.0 for Swin pretraining, 0.1 for ViT-B).")
    layer_scale_init: float = _f(0.1, "ViT only: layer scale init value (0 disables layer scale).")
    mask_token_init: Literal["trunc_normal", "zeros"] = _f("trunc_normal", "Mask token init: truncated normal "
                                                                            "std 0.02 (Swin: cut at +-2 absolute, "
                                                                            "as the official Swin; ViT: cut at "
                                                                            "+-0.02, as the official ViT), or "
                                                                            "zeros.")
    norm_targets: bool = _f(False, "SwinV2 recipe: normalise the reconstruction target by its local mean and "
                                   "variance over a norm_targets_window square window.")
    norm_targets_window: int = _f(47, "Odd window size (pixels) for norm_targets.")
    init_weights: Optional[str] = _f(None, "Start the encoder from this timm state file (.safetensors/.pth: a timm "
                                           "state_dict, an export or a SimMIM checkpoint model file); weights only "
                                           "(--resume continues a run). null = random init.")
    init_strict: bool = _f(False, "With model.init_weights: refuse any missing, unexpected or mismatched key.")
    ops_backend: Literal["auto", "triton", "torch"] = _f("auto", "Implementation of mask-token substitution and "
                                                               "the masked L1 loss (and of the window attention with "
                                                               "model.attention 'fused'): 'auto' (fused Triton kernels on "
                                                               "CUDA, reference elsewhere), 'triton' or 'torch'.")
    attention: Literal["timm", "fused"] = _f("timm", "Swin block attention: 'timm' (timm's roll, window partition, "
                                                  "attention, reverse, roll back) or 'fused' (encoder 'swin' only: the fused "
                                                  "window-attention op between the same qkv and proj Linears; "
                                                  "its backend is model.ops_backend). Same parameters and "
                                                  "state dict either way.")

    def validate(self) -> None:
        _positive(self, "img_size", "patch_size", "in_chans", "embed_dim", "window_size", "norm_targets_window")
        if self.img_size % self.patch_size:
            _err("model.img_size", self.img_size, f"must be divisible by model.patch_size ({self.patch_size})")
        if not self.depths or any(d < 1 for d in self.depths):
            _err("model.depths", self.depths, "must be a non-empty list of positive ints")
        if len(self.num_heads) != len(self.depths) or any(h < 1 for h in self.num_heads):
            _err("model.num_heads", self.num_heads,
                 f"must be a list of positive ints with one entry per stage ({len(self.depths)})")
        if self.encoder == "vit" and len(self.depths) != 1:
            _err("model.depths", self.depths, "must have exactly one entry (the number of blocks) for encoder 'vit'")
        for i, h in enumerate(self.num_heads):
            width = self.embed_dim * (2 ** i if self.is_swin else 1)
            if width % h:
                _err("model.num_heads", self.num_heads, f"stage {i} width {width} is not divisible by {h} heads")
        if not self.mlp_ratio > 0:
            _err("model.mlp_ratio", self.mlp_ratio, "must be > 0")
        if not 0 <= self.drop_path_rate < 1:
            _err("model.drop_path_rate", self.drop_path_rate, "must be in [0, 1)")
        if self.layer_scale_init < 0:
            _err("model.layer_scale_init", self.layer_scale_init, "must be >= 0")
        if self.norm_targets_window % 2 == 0:
            _err("model.norm_targets_window", self.norm_targets_window, "must be odd")
        if self.attention == "fused" and self.encoder != "swin":
            # The op computes dot-product attention with an additive bias; SwinV2's scaled cosine attention
            # with its continuous position bias is not (yet) one of its modes.
            _err("model.attention", self.attention, f"is for encoder 'swin' only, not '{self.encoder}'")
        if self.encoder == "swinv2" and self.img_size % self.patch_size == 0:
            # The official SwinV2 cannot run a map that is neither a multiple of the window nor smaller
            # than it (timm would pad it): refuse rather than compute something the official code does not.
            side = self.img_size // self.patch_size
            for i in range(len(self.depths)):
                s = side // 2 ** i
                if s > self.window_size and s % self.window_size:
                    _err("model.window_size", self.window_size, f"stage {i} map is {s} x {s} tokens: the window "
                         f"must divide it or be at least as large (SwinV2)")

    @property
    def is_swin(self) -> bool:
        """A hierarchical Swin-family encoder (swin or swinv2)."""
        return self.encoder in ("swin", "swinv2")

    @property
    def encoder_stride(self) -> int:
        """Pixels per output token of the encoder (32 for Swin with 4 stages, 16 for ViT-B/16)."""
        if self.is_swin:
            return self.patch_size * 2 ** (len(self.depths) - 1)
        return self.patch_size


@dataclass
class MaskConfig:
    mask_patch_size: int = _f(32, "Side of a square mask patch in pixels; img_size must be a multiple of it, "
                                  "and it must be a multiple of model.patch_size.")
    mask_ratio: float = _f(0.6, "Fraction of mask patches masked per image, in (0, 1); the count is "
                                "ceil(grid * grid * ratio).")

    def validate(self) -> None:
        _positive(self, "mask_patch_size")
        if not 0 < self.mask_ratio < 1:
            _err("mask.mask_ratio", self.mask_ratio, "must be in (0, 1)")


@dataclass
class DataConfig:
    backend: Literal["torch", "dali", "dali_cpu", "synthetic"] = _f(
        "torch", "Loader: 'torch' (torchvision + DataLoader workers), 'dali' (GPU JPEG decode), 'dali_cpu' "
                 "(DALI on CPU threads) or 'synthetic' (random tensors on the device: measures the model only).")
    path: Optional[str] = _f(None, "Dataset: an ImageFolder tree, a flat folder of images, a text file "
                                   "listing image paths, or a folder of shards (`simmim-fast shard`). null = the "
                                   "sample photos that scikit-image ships.")
    layout: Literal["auto", "imagefolder", "flat", "filelist", "webdataset"] = _f(
        "auto", "How to read data.path: 'auto' detects (a shard folder or its manifest.json -> webdataset; "
                "another file -> filelist; folder with only sub-folders of images -> imagefolder; else flat). "
                "'webdataset': tar shards written by `simmim-fast shard` (data.path = their folder or manifest).")
    num_workers: int = _f(4, "Loader worker processes (torch) or threads (dali, dali_cpu).")
    crop_scale: Tuple[float, float] = _f((0.67, 1.0), "RandomResizedCrop area fraction range.")
    crop_ratio: Tuple[float, float] = _f((3 / 4, 4 / 3), "RandomResizedCrop aspect ratio range.")
    hflip_prob: float = _f(0.5, "Horizontal flip probability.")
    mean: List[float] = _f([0.485, 0.456, 0.406], "Normalisation mean, one number per channel (model.in_chans), "
                                                   "in the loaders' 0-1 value space; the default is ImageNet's "
                                                   "RGB mean, so any in_chans other than 3 must set it.")
    std: List[float] = _f([0.229, 0.224, 0.225], "Normalisation std, one number per channel (model.in_chans), "
                                                  "0-1 value space; default ImageNet's RGB std.")
    output_dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", "Dtype of the images the loader yields (float16 comes straight out of DALI; bfloat16 is "
                   "cast on the device). Masks are always uint8.")
    check: Literal["header", "decode"] = _f(
        "header", "How files are checked before training (results cached, see data.cache_dir): 'header' reads "
                  "each header and checks that JPEGs/PNGs are not cut off; 'decode' decodes every file once.")
    cache_dir: Optional[str] = _f(None, "Folder for the file index (image sizes, unusable files) and the PNG copies "
                                        "of images the DALI decoders cannot read (e.g. GIF). null = "
                                        "$XDG_CACHE_HOME/simmim-fast or ~/.cache/simmim-fast.")
    min_image_side: int = _f(0, "Files whose shorter side is below this many pixels are skipped like undecodable "
                                "ones; 0 keeps every decodable image (small ones are upsampled by the crop).")
    max_skipped_fraction: float = _f(0.01, "Refuse to start (error naming the files) when more than this fraction "
                                           "of the dataset cannot be used; 1.0 never refuses, 0.0 refuses any "
                                           "unusable file. Files found undecodable during training never stop it.")
    dali_prefetch: int = _f(2, "Batches the DALI backends keep in flight ahead of the consumer.")
    dali_hw_decoder_load: float = _f(0.65, "Backend 'dali': share of JPEG work given to the GPU's hardware JPEG "
                                           "decoder (A100/H100), in [0, 1].")
    synthetic_samples: int = _f(1281167, "Backend 'synthetic': samples per epoch (default: ImageNet-1K train size).")
    vflip_prob: float = _f(0.0, "Vertical flip probability (backend 'torch'; every band alike). For overhead "
                                "imagery, which has no up.")
    rot90: bool = _f(False, "Rotate each sample by 0, 90, 180 or 270 degrees, uniformly (backend 'torch'; "
                            "after the crop-resize, so the square output keeps its size).")
    value_range: Optional[Tuple[float, float]] = _f(
        None, "[lo, hi] in stored pixel units mapped to 0..1 (not clipped), e.g. [0, 4095] for 12-bit sensor data "
              "in 16-bit files; null = the default scaling (uint8 / 255, uint16 / 65535, float as stored). "
              "Backend 'torch'; data.mean / data.std and `simmim-fast stats` are in the mapped space.")

    def validate(self) -> None:
        if self.num_workers < 0:
            _err("data.num_workers", self.num_workers, "must be >= 0")
        if self.min_image_side < 0:
            _err("data.min_image_side", self.min_image_side, "must be >= 0")
        if not 0 <= self.max_skipped_fraction <= 1:
            _err("data.max_skipped_fraction", self.max_skipped_fraction, "must be in [0, 1]")
        if self.dali_prefetch < 1:
            _err("data.dali_prefetch", self.dali_prefetch, "must be >= 1")
        if not 0 <= self.dali_hw_decoder_load <= 1:
            _err("data.dali_hw_decoder_load", self.dali_hw_decoder_load, "must be in [0, 1]")
        if self.synthetic_samples < 1:
            _err("data.synthetic_samples", self.synthetic_samples, "must be >= 1")
        if self.cache_dir is not None and not self.cache_dir.strip():
            _err("data.cache_dir", self.cache_dir, "must be a folder path or null")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            _err("data.crop_scale", list(self.crop_scale), "must be [lo, hi] with 0 < lo <= hi <= 1")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            _err("data.crop_ratio", list(self.crop_ratio), "must be [lo, hi] with 0 < lo <= hi")
        if not 0 <= self.hflip_prob <= 1:
            _err("data.hflip_prob", self.hflip_prob, "must be in [0, 1]")
        if any(s <= 0 for s in self.std):
            _err("data.std", list(self.std), "must be positive")
        if not 0 <= self.vflip_prob <= 1:
            _err("data.vflip_prob", self.vflip_prob, "must be in [0, 1]")
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            _err("data.value_range", list(self.value_range), "must be [lo, hi] with lo < hi, or null")


@dataclass
class TrainConfig:
    epochs: int = _f(100, "Training epochs.")
    warmup_epochs: int = _f(10, "Epochs of per-iteration linear warmup from warmup_lr to the scaled base lr.")
    base_lr: float = _f(2e-4, "Peak learning rate for a total batch of 512; scaled by global_batch_size / 512.")
    warmup_lr: float = _f(1e-6, "Learning rate at step 0 for a total batch of 512 (scaled likewise).")
    min_lr: float = _f(1e-5, "Final learning rate of the cosine schedule for a total batch of 512 (scaled "
                             "likewise). Unused by multistep.")
    lr_scheduler: Literal["cosine", "multistep"] = _f("cosine", "After warmup: 'cosine' to min_lr, or "
                                                                "'multistep' (x decay_rate at each decay_epochs).")
    decay_epochs: List[int] = _f([], "Multistep: epochs at which the lr is multiplied by decay_rate.")
    decay_rate: float = _f(0.1, "Multistep: the factor applied at each of decay_epochs.")
    weight_decay: float = _f(0.05, "AdamW weight decay (not applied to 1-D parameters, biases, position "
                                   "embeddings, the mask token, relative position bias tables and SwinV2's "
                                   "continuous position bias MLPs and logit scales).")
    betas: Tuple[float, float] = _f((0.9, 0.999), "AdamW betas.")
    eps: float = _f(1e-8, "AdamW eps.")
    clip_grad: Optional[float] = _f(5.0, "Gradient clipping max norm; null disables.")
    layer_decay: float = _f(1.0, "Layer-wise lr decay (1.0 = none; fine-tuning uses < 1).")
    global_batch_size: int = _f(2048, "Images per optimiser step over all ranks and accumulation steps.")
    micro_batch_size: int = _f(128, "Images per rank per forward/backward. Accumulation steps = "
                                    "global_batch_size / (micro_batch_size * world size), which must be an int.")
    max_steps: Optional[int] = _f(None, "Stop after this many optimiser steps (the schedule still spans 'epochs'); "
                                        "null = run all epochs.")
    seed: int = _f(0, "Random seed (model init, data order, augmentation, masks).")
    nan_policy: Literal["stop", "skip"] = _f("stop", "On a non-finite loss: 'stop' (error, nothing corrupt is "
                                                     "saved) or 'skip' the step and count it.")
    max_skipped_steps: int = _f(100, "With nan_policy 'skip': stop after this many skipped steps in a row.")
    decay_position_bias: bool = _f(False, "true = apply weight decay to exactly what the official SimMIM pretraining "
                                          "decayed: relative position bias tables, SwinV2's cpb MLP weights and "
                                          "logit scale, and for ViT the mask token (its exemption rule never "
                                          "matched; see docs/ENGINE.md). false = exempt them, as it intended. "
                                          "Pretraining only.")

    def validate(self) -> None:
        _positive(self, "epochs", "global_batch_size", "micro_batch_size")
        if not 0 <= self.warmup_epochs <= self.epochs:
            _err("train.warmup_epochs", self.warmup_epochs, f"must be in [0, train.epochs = {self.epochs}]")
        for k in ("base_lr", "warmup_lr", "min_lr", "weight_decay", "eps"):
            if getattr(self, k) < 0:
                _err(f"train.{k}", getattr(self, k), "must be >= 0")
        if not self.base_lr > 0:
            _err("train.base_lr", self.base_lr, "must be > 0")
        if any(not 0 <= b < 1 for b in self.betas):
            _err("train.betas", list(self.betas), "must be two numbers in [0, 1)")
        if self.clip_grad is not None and not self.clip_grad > 0:
            _err("train.clip_grad", self.clip_grad, "must be > 0 or null")
        if not 0 < self.layer_decay <= 1:
            _err("train.layer_decay", self.layer_decay, "must be in (0, 1]")
        if self.lr_scheduler == "multistep":
            if any(e < 0 or e > self.epochs for e in self.decay_epochs) or sorted(self.decay_epochs) != self.decay_epochs:
                _err("train.decay_epochs", self.decay_epochs, f"must be increasing epochs in [0, {self.epochs}]")
        if not 0 < self.decay_rate <= 1:
            _err("train.decay_rate", self.decay_rate, "must be in (0, 1]")
        if self.global_batch_size % self.micro_batch_size:
            _err("train.global_batch_size", self.global_batch_size,
                 f"must be a multiple of train.micro_batch_size ({self.micro_batch_size})")
        if self.max_steps is not None and self.max_steps < 1:
            _err("train.max_steps", self.max_steps, "must be >= 1 or null")
        if self.max_skipped_steps < 1:
            _err("train.max_skipped_steps", self.max_skipped_steps, "must be >= 1")

    def accumulation_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"config key 'train.global_batch_size' = {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size}) x world size ({world_size}) = {per_step}; "
                f"change one of them (e.g. --set train.micro_batch_size=...)")
        return self.global_batch_size // per_step


@dataclass
class EngineConfig:
    mode: Literal["deepspeed", "torch"] = _f("deepspeed", "'deepspeed' (ZeRO, checkpoints through DeepSpeed) or "
                                                          "'torch' (plain PyTorch/DDP, the yardstick).")
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage 0-3.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "Training precision: 'auto' (bf16 on CUDA, fp32 on the CPU, where bf16 autocast is slow), bf16, "
                "fp16 (dynamic loss scaling; CUDA only) or fp32.")
    bf16_weights: bool = _f(False, "bf16 in deepspeed mode: keep the model weights in bf16 through DeepSpeed's "
                                   "bf16 mode (fp32 master weights live in the optimizer) instead of fp32 weights + "
                                   "torch.autocast. Less weight traffic, but activations and the residual stream "
                                   "are bf16 too (autocast keeps them fp32).")
    compile: Union[bool, Literal["auto"]] = _f("auto", "torch.compile the model (DeepSpeed: engine.compile()): "
                                                       "'auto' = on with CUDA except at ZeRO-3 (graph breaks at "
                                                       "every module, see docs/ENGINE.md), off on the CPU; "
                                                       "true/false force it.")
    optimizer: Literal["auto", "torch_fused", "torch_foreach", "deepspeed_fused", "deepspeed_cpu"] = _f(
        "auto", "AdamW implementation: 'auto' (torch fused on CUDA, torch foreach on the CPU, DeepSpeed CPU Adam with "
                "engine.offload), 'torch_fused', 'torch_foreach', 'deepspeed_fused' (DeepSpeed FusedAdam; JIT-builds "
                "a CUDA op) or 'deepspeed_cpu' (DeepSpeed CPU Adam, only with engine.offload; JIT-builds a C++ op).")
    overlap_comm: Union[bool, Literal["auto"]] = _f(
        "auto", "DeepSpeed zero_optimization.overlap_comm: 'auto' = on with more than one rank at ZeRO >= 2, off "
                "with one rank (DeepSpeed synchronises the device at every bucket when it is on).")
    reduce_bucket_size: int = _f(25_000_000, "DeepSpeed ZeRO reduce bucket (elements); smaller buckets overlap more "
                                             "of the gradient reduction with the backward pass.")
    allgather_bucket_size: int = _f(25_000_000, "DeepSpeed ZeRO-1/2 all-gather bucket (elements).")
    deepspeed: Dict[str, Any] = _f({}, "Extra DeepSpeed config keys, merged over the derived DeepSpeed config "
                                       "(nested dicts merge key by key).")
    dist_backend: Literal["auto", "nccl", "gloo"] = _f("auto", "torch.distributed backend: auto = nccl on CUDA, "
                                                               "gloo on the CPU.")
    cpu_threads: int = _f(0, "CPU runs: intra-op threads per rank. 0 = OMP_NUM_THREADS if set, else cores / (2 x "
                             "ranks on the machine), at least 1 (more threads than free cores makes every op "
                             "wait on the others).")
    activation_checkpointing: Union[bool, int] = _f(
        False, "Activation checkpointing of the encoder blocks (torch.utils.checkpoint, non-reentrant): false = off, "
               "true = every block, N = every N-th block (blocks 0, N, 2N, ... over all stages). A checkpointed block "
               "keeps only its input and runs its forward again in the backward pass (one more forward of it; "
               "drop path drops the same samples both times).")
    offload: Literal["none", "optimizer", "optimizer_and_params"] = _f(
        "none", "DeepSpeed ZeRO-Offload: 'optimizer' keeps the fp32 master weights and Adam states on engine."
                "offload_device and steps them there with DeepSpeed's CPU Adam (ZeRO >= 1; nvme needs ZeRO-3); "
                "'optimizer_and_params' also keeps the parameters there between uses (ZeRO-3 only). Needs engine.mode "
                "'deepspeed'.")
    offload_device: Literal["cpu", "nvme"] = _f("cpu", "Where engine.offload puts its tensors: 'cpu' (pinned host "
                                                       "memory on CUDA) or 'nvme' (files under engine.nvme_path, "
                                                       "through DeepSpeed's async_io op; ZeRO-3).")
    nvme_path: Optional[str] = _f(None, "Folder on a fast local NVMe drive for engine.offload_device 'nvme'.")

    def validate(self) -> None:
        if self.cpu_threads < 0:
            _err("engine.cpu_threads", self.cpu_threads, "must be >= 0 (0 = automatic)")
        if self.zero_stage not in (0, 1, 2, 3):
            _err("engine.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        if self.bf16_weights and self.precision not in ("bf16", "auto"):
            _err("engine.bf16_weights", self.bf16_weights, f"needs engine.precision bf16 (is {self.precision!r})")
        if self.bf16_weights and self.mode != "deepspeed":
            _err("engine.bf16_weights", self.bf16_weights, "needs engine.mode 'deepspeed' (torch mode uses autocast)")
        if self.mode == "torch" and self.zero_stage not in (0, 1):
            _err("engine.zero_stage", self.zero_stage, "must be 0 or 1 with engine.mode 'torch' (no ZeRO there); "
                                                       "use engine.mode 'deepspeed' for ZeRO")
        if self.mode == "torch" and self.optimizer == "deepspeed_fused":
            _err("engine.optimizer", self.optimizer, "needs engine.mode 'deepspeed'")
        _positive(self, "reduce_bucket_size", "allgather_bucket_size")
        ac = self.activation_checkpointing
        if not isinstance(ac, bool) and ac < 1:
            _err("engine.activation_checkpointing", ac, "must be false, true or a block period N >= 1")
        if self.offload != "none":
            if self.mode != "deepspeed":
                _err("engine.offload", self.offload, "needs engine.mode 'deepspeed' (ZeRO-Offload is DeepSpeed's)")
            if self.offload == "optimizer_and_params" and self.zero_stage != 3:
                _err("engine.offload", self.offload, f"needs engine.zero_stage 3 (is {self.zero_stage}): only ZeRO-3 "
                     f"partitions the parameters; use 'optimizer' at ZeRO 1-2")
            if self.zero_stage == 0:
                _err("engine.offload", self.offload, "needs engine.zero_stage >= 1 (ZeRO-0 has no partitioned "
                                                     "optimizer to offload)")
            if self.offload_device == "nvme" and self.zero_stage != 3:
                _err("engine.offload_device", self.offload_device, f"'nvme' needs engine.zero_stage 3 (is "
                                                                   f"{self.zero_stage}); use 'cpu'")
            if self.offload_device == "nvme" and not self.nvme_path:
                _err("engine.nvme_path", self.nvme_path, "must name a folder with engine.offload_device 'nvme'")
            if self.optimizer not in ("auto", "deepspeed_cpu"):
                _err("engine.optimizer", self.optimizer, f"must be 'auto' or 'deepspeed_cpu' with engine.offload "
                     f"{self.offload!r} (the offloaded optimizer steps on the CPU with DeepSpeed's CPU Adam)")
        elif self.optimizer == "deepspeed_cpu":
            _err("engine.optimizer", self.optimizer, "needs engine.offload 'optimizer' or 'optimizer_and_params'")
        reserved = sorted({"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                           "optimizer", "scheduler"} & set(self.deepspeed))
        if reserved:
            _err(f"engine.deepspeed.{reserved[0]}", self.deepspeed[reserved[0]],
                 "is derived from the train section (batch sizes, optimiser, schedule); set train.* instead")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(1000, "Save a checkpoint every this many optimiser steps (and always at the end).")
    keep_last: int = _f(3, "Keep this many most recent checkpoints (older ones are deleted after a good save).")
    save_at_end: bool = _f(True, "Also save when training ends (max_steps or the last epoch).")

    def validate(self) -> None:
        _positive(self, "every_steps", "keep_last")


@dataclass
class ProbeConfig:
    data: Optional[str] = _f(None, "Online kNN probe while pretraining: 'fashion-mnist' (or 'fashion-mnist:/idx/folder') "
                                   "or an ImageFolder root with train/ and val/ class folders; null = no probe. "
                                   "Every every_steps optimiser steps rank 0 extracts frozen features and logs "
                                   "the `knn` tool's top-1 (probe/knn_top1) and its cost (probe/seconds).")
    every_steps: int = _f(1000, "Probe every this many optimiser steps.")
    train_limit: Optional[int] = _f(2000, "Seeded random subset of this many labelled training images (bounds the "
                                          "cost); null = all.")
    val_limit: Optional[int] = _f(1000, "Seeded random subset of this many validation images; null = all.")
    k: int = _f(20, "kNN neighbours.")
    temperature: float = _f(0.07, "kNN vote weight exp(similarity / T).")
    vit_block: Optional[int] = _f(None, "ViT: the intermediate block also reported (probe/knn_top1_block<k>); null = "
                                        "two thirds of the depth, as the `knn` tool.")
    batch_size: int = _f(128, "Feature extraction batch size.")
    num_workers: int = _f(0, "Feature extraction DataLoader workers.")
    seed: int = _f(0, "Seed of the subsets (the `knn` tool's --seed).")

    def validate(self) -> None:
        check_positive("logging.probe", self, "every_steps", "k", "batch_size")
        for k in ("train_limit", "val_limit", "vit_block"):
            v = getattr(self, k)
            if v is not None and v < 1:
                _err(f"logging.probe.{k}", v, "must be a positive int or null")
        if not self.temperature > 0:
            _err("logging.probe.temperature", self.temperature, "must be > 0")
        if self.num_workers < 0:
            _err("logging.probe.num_workers", self.num_workers, "must be >= 0")


@dataclass
class WandbConfig:
    enabled: bool = _f(False, "Log to Weights & Biases (pip install -e \".[wandb]\"): the scalars TensorBoard gets, "
                              "the resolved config and the reconstruction grids.")
    project: str = _f("simmim-fast", "W&B project.")
    entity: Optional[str] = _f(None, "W&B entity (team or user); null = the account default.")
    name: Optional[str] = _f(None, "W&B run name; null = the config's name.")
    mode: Literal["online", "offline"] = _f("online", "'online' (streams to the server) or 'offline' (run files "
                                                      "under <output_dir>/wandb; `wandb sync` uploads them).")


@dataclass
class MlflowConfig:
    enabled: bool = _f(False, "Log to MLflow (pip install -e \".[mlflow]\"): the scalars TensorBoard gets, the "
                              "resolved config and the reconstruction grids.")
    tracking_uri: Optional[str] = _f(None, "MLflow tracking URI (http://..., sqlite:///..., file:/folder); null = "
                                           "a SQLite store <output_dir>/mlflow.db with artifacts in "
                                           "<output_dir>/mlartifacts.")
    experiment: str = _f("simmim-fast", "MLflow experiment name (created if missing).")
    run_name: Optional[str] = _f(None, "MLflow run name; null = the config's name.")


@dataclass
class LoggingConfig:
    print_every: int = _f(10, "Progress/metrics log interval in optimiser steps.")
    tensorboard: bool = _f(True, "Write TensorBoard scalars under <output_dir>/tensorboard.")
    visualize_every: int = _f(0, "Write a reconstruction PNG grid every this many steps (0 = never).")
    progress_bar: Union[bool, Literal["auto"]] = _f("auto", "Rank 0 progress bar (loss, lr, img/s, ETA): 'auto' = "
                                                            "when stderr is a terminal, else one log line per "
                                                            "print_every steps.")
    loss_curve: bool = _f(True, "Write <output_dir>/loss_curve.png from metrics.jsonl at every checkpoint and at "
                                "the end.")
    probe: ProbeConfig = _f(ProbeConfig(), "Online kNN probe while pretraining (off unless probe.data is set).")
    wandb: WandbConfig = _f(WandbConfig(), "Weights & Biases tracking (off unless wandb.enabled).")
    mlflow: MlflowConfig = _f(MlflowConfig(), "MLflow tracking (off unless mlflow.enabled).")

    def validate(self) -> None:
        _positive(self, "print_every")
        if self.visualize_every < 0:
            _err("logging.visualize_every", self.visualize_every, "must be >= 0")
        self.probe.validate()


@dataclass
class FinetuneConfig:
    data: Optional[str] = _f(None, "Labelled data for `simmim-fast finetune`: 'fashion-mnist' (or "
                                   "'fashion-mnist:/idx/folder') or an ImageFolder root with train/ and val/ "
                                   "class folders. Unused by pretraining.")
    num_classes: Optional[int] = _f(None, "Classifier outputs; null = the number of classes in the data.")
    label_smoothing: float = _f(0.1, "Label smoothing of the cross-entropy (also applied to mixup targets).")
    mixup: float = _f(0.8, "Mixup alpha (timm.data.Mixup); 0 disables.")
    cutmix: float = _f(1.0, "CutMix alpha (timm.data.Mixup); 0 disables.")
    mixup_prob: float = _f(1.0, "Probability of applying mixup or cutmix to a batch.")
    mixup_switch_prob: float = _f(0.5, "Probability of cutmix instead of mixup when both are on.")
    auto_augment: Optional[str] = _f("rand-m9-mstd0.5-inc1", "timm auto-augment policy for ImageFolder training "
                                                              "images (RandAugment m9); null disables.")
    reprob: float = _f(0.25, "Random erasing probability for ImageFolder training images.")
    train_limit: Optional[int] = _f(None, "Use a seeded random subset of this many training images (quick runs).")
    val_limit: Optional[int] = _f(None, "Use a seeded random subset of this many validation images (quick runs).")
    eval_batch_size: int = _f(128, "Images per rank per evaluation forward.")

    def validate(self) -> None:
        for k in ("label_smoothing", "mixup_prob", "mixup_switch_prob", "reprob"):
            if not 0 <= getattr(self, k) <= 1:
                _err(f"finetune.{k}", getattr(self, k), "must be in [0, 1]")
        for k in ("mixup", "cutmix"):
            if getattr(self, k) < 0:
                _err(f"finetune.{k}", getattr(self, k), "must be >= 0 (0 disables)")
        for k in ("num_classes", "train_limit", "val_limit"):
            v = getattr(self, k)
            if v is not None and v < 1:
                _err(f"finetune.{k}", v, "must be a positive int or null")
        _positive(self, "eval_batch_size")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Encoder, head and loss."})
    mask: MaskConfig = field(default_factory=MaskConfig, metadata={"help": "Random masking."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Dataset and augmentation."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation and schedule."})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "Training engine."})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "Checkpoints."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "Logging."})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={"help": "Fine-tuning "
                                     "(`simmim-fast finetune`): data, classes, regularisation."})
    name: str = _f("simmim", "Run name (used in log lines and as the default output folder name).")

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.validate()
        m = self.model
        if len(self.data.mean) != m.in_chans or len(self.data.std) != m.in_chans:
            _err("data.mean", list(self.data.mean),
                 f"and data.std = {list(self.data.std)} must have model.in_chans = {m.in_chans} numbers each "
                 f"(e.g. from `simmim-fast stats DATA`)")
        if m.img_size % self.mask.mask_patch_size:
            _err("model.img_size", m.img_size,
                 f"must be divisible by mask.mask_patch_size ({self.mask.mask_patch_size})")
        if self.mask.mask_patch_size % m.patch_size:
            _err("mask.mask_patch_size", self.mask.mask_patch_size,
                 f"must be divisible by model.patch_size ({m.patch_size})")
        if m.is_swin and m.img_size % m.encoder_stride:
            _err("model.img_size", m.img_size,
                 f"must be divisible by the Swin encoder stride {m.encoder_stride} "
                 f"(patch_size x 2^(stages - 1))")


def load_config(source: Union[str, os.PathLike, Dict[str, Any], Config, None] = None,
                overrides: Sequence[str] = ()) -> Config:
    """Load, validate and return a Config.

    Args:
        source: a JSON file path, a dict of raw config data, a Config (re-validated), or None for defaults.
        overrides: dotted ``section.key=value`` strings applied on top (values parsed as JSON).
    Raises:
        ConfigError: naming the file, the key and the value for anything wrong (a missing file too).
    """
    return load_typed(Config, source, overrides)
