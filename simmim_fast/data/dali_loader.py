"""The 'dali' and 'dali_cpu' backends: one NVIDIA DALI pipeline, GPU ("mixed") or CPU decoding.

Per step, Python hands the pipeline three small arrays computed for the whole batch at once
(file paths, crop boxes, flip flags: see plan.py); DALI reads the files on its CPU threads,
decodes only each crop box (nvJPEG / the hardware JPEG decoder with 'mixed', libjpeg-turbo with
'cpu'), resizes, flips, normalises and lays the batch out as CHW, and the result reaches torch
through DLPack without a copy. Both backends share this definition; they differ only in the
decoder's device.

A DALI pipeline cannot skip a sample: a file that fails to decode fails the batch and leaves
the pipeline unusable. The index keeps known-bad files out; if one slips through, the files of
the failed batches are tried one by one, the culprit is replaced (or, if PIL can decode it,
re-encoded as PNG), the pipeline is rebuilt and the batch is run again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import deque
from pathlib import Path
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .index import CONVERT
from .plan import Planner, StepPlan
from .transforms import load_rgb
from .webdataset import MemberTable, source_key

__all__ = ["DaliDataBackend", "import_dali", "converted_copy"]

log = logging.getLogger("simmim_fast.data")


def import_dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError as e:
        raise ImportError("data.backend 'dali' / 'dali_cpu' needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                          "(or pip install -e '.[dali]'); see DEVELOPERS.md for a GPU machine without a package "
                          "registry, or use data.backend 'torch'") from e
    return dali, fn, types


def converted_copy(path, cache_dir: Path) -> Path:
    """An 8-bit RGB PNG copy of an image (file or shard member) the DALI decoders cannot read (made once,
    then reused)."""
    key = hashlib.sha1(source_key(path).encode("utf-8", "surrogateescape")).hexdigest()
    out = cache_dir / "converted" / f"{key[:24]}.png"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        load_rgb(path).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, out)
    return out


def _dali_error_summary(e: BaseException) -> str:
    """The operator and its message from a DALI pipeline error (which never names the file)."""
    text = str(e)
    op = re.search(r"operator `(?:nvidia\.dali\.fn\.)?([\w.]+)`", text)
    if "encountered:" in text:  # DALI puts the operator's own message after this word
        text = text.split("encountered:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "no longer valid" not in ln]
    msg = re.sub(r"\s*sample #\d+\s*:?\s*$", " sample", lines[0]) if lines else type(e).__name__
    return ((op.group(1) + ": " if op else "") + msg)[:200]


class _UnreadableSample(Exception):
    def __init__(self, file: int, reason: str):
        super().__init__(reason)
        self.file, self.reason = file, reason


class DaliDataBackend:
    def __init__(self, planner: Planner, size: int, gpu: bool, device: torch.device, num_threads: int,
                 prefetch: int, hw_decoder_load: float, output_fp16: bool, cache_dir: Path):
        self.dali, self.fn, self.types = import_dali()
        d = planner.data
        self.planner, self.index = planner, planner.index
        self.size, self.gpu, self.device = size, gpu, device
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
        self.num_threads, self.prefetch = max(1, num_threads), max(1, prefetch)
        self.hw_decoder_load, self.output_fp16 = hw_decoder_load, output_fp16
        self.mean = [255.0 * m for m in d.mean]
        self.std = [255.0 * s for s in d.std]
        self.cache_dir = cache_dir
        self.name = "dali" if gpu else "dali_cpu"
        # Shards: the member bytes are read here (one pread each) and fed to the decoder, so samples,
        # order and stand-ins are the planner's, exactly as for files (fn.readers.webdataset reads in
        # its own order and cannot skip a bad member).
        self.members = isinstance(self.index.paths, MemberTable)
        self._encoded: Dict[int, np.ndarray] = {}  # file -> its PNG copy's path, for files DALI cannot read
        self._pipe = None
        self._probe = None
        self._inflight: Deque[StepPlan] = deque()  # plans scheduled on self._pipe, oldest first
        self._generation = 0  # counts run() calls; only the latest may use the pipeline
        for i in np.flatnonzero(self.index.status == CONVERT):
            self._use_converted(int(i))

    # ---------------------------------------------------------------------------------------
    def _use_converted(self, file: int) -> bool:
        path = self.index.paths[file]
        try:
            self._encoded[file] = self._encode(converted_copy(path, self.cache_dir))
            return True
        except Exception as e:  # noqa: BLE001 - unwritable cache or an undecodable file: skip it
            self.planner.report_bad(file, f"cannot be re-encoded for DALI: {type(e).__name__}: {e}")
            return False

    @staticmethod
    def _encode(path: Path) -> np.ndarray:
        return np.frombuffer(os.fsencode(str(path)), dtype=np.uint8)

    def _path_bytes(self, file: int) -> np.ndarray:
        # Encoded per batch, not cached: ~1 us a path, where a cache would hold ~200 bytes per file.
        enc = self._encoded.get(file)  # only the files read from a PNG copy
        return np.frombuffer(self.index.paths.raw(file), dtype=np.uint8) if enc is None else enc

    def _sample_bytes(self, file: int) -> np.ndarray:
        enc = self._encoded.get(file)
        if enc is not None:  # a PNG copy of a member DALI cannot decode
            return np.fromfile(os.fsdecode(enc.tobytes()), dtype=np.uint8)
        return np.frombuffer(self.index.paths[file].read(), dtype=np.uint8)

    def _build(self):
        fn, types = self.fn, self.types
        # Queue depth 1: run() keeps data.dali_prefetch iterations scheduled itself (the dynamic
        # executor runs them ahead without blocking), which needs no priming and drains cleanly.
        pipe = self.dali.Pipeline(batch_size=self.planner.batch_size, num_threads=self.num_threads,
                                  device_id=self.device_id, prefetch_queue_depth=1, exec_dynamic=True,
                                  seed=self.planner.seed)
        with pipe:
            if self.members:
                encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            else:
                paths = fn.external_source(name="paths", dtype=types.UINT8, ndim=1)
                encoded = fn.io.file.read(paths)
            anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            decode = dict(output_type=types.RGB, adjust_orientation=False, normalized_anchor=False,
                          normalized_shape=False)
            if self.gpu:
                # fancy upsampling: the chroma upsampling of libjpeg-turbo, i.e. of the CPU backends
                decode.update(device="mixed", hw_decoder_load=self.hw_decoder_load, jpeg_fancy_upsampling=True)
            else:
                decode.update(device="cpu")
            images = fn.decoders.image_slice(encoded, anchor, shape, **decode)
            images = fn.resize(images, resize_x=self.size, resize_y=self.size, interp_type=types.INTERP_LINEAR,
                               antialias=True)
            images = fn.crop_mirror_normalize(images, mirror=flip, mean=self.mean, std=self.std,
                                              dtype=types.FLOAT16 if self.output_fp16 else types.FLOAT,
                                              output_layout="CHW")
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def _feed(self, pipe, plan: StepPlan, samples: Optional[Sequence[int]] = None) -> None:
        v = plan.views
        idx = np.arange(len(plan.files)) if samples is None else np.asarray(samples)
        if self.members:
            data = []
            for j in idx:
                file = int(plan.files[j])
                try:
                    data.append(self._sample_bytes(file))
                except OSError as e:  # e.g. a shard cut short since the index was built
                    raise _UnreadableSample(file, f"unreadable: {type(e).__name__}: {e}") from e
            pipe.feed_input("encoded", data)
        else:
            pipe.feed_input("paths", [self._path_bytes(int(plan.files[j])) for j in idx])
        pipe.feed_input("anchor", np.stack([v.left[idx], v.top[idx]], axis=1).astype(np.int32))
        pipe.feed_input("shape", np.stack([v.width[idx], v.height[idx]], axis=1).astype(np.int32))
        pipe.feed_input("flip", v.flip[idx].astype(np.int32))
        pipe.schedule_run()

    def _to_torch(self, out) -> torch.Tensor:
        tensor = out[0].as_tensor()
        if self.gpu:
            with torch.cuda.device(self.device):
                return torch.from_dlpack(tensor)
        return torch.from_dlpack(tensor)

    def _outputs(self, pipe):
        return pipe.outputs(torch.cuda.current_stream(self.device)) if self.gpu else pipe.outputs()

    # ---------------------------------------------------------------------------------------
    def run(self, epoch: int, steps: Sequence[int]) -> Iterator[Tuple[int, torch.Tensor, np.ndarray]]:
        # One pipeline serves one epoch iterator at a time: a new one takes over and the old one stops.
        self._abandon()
        self._generation += 1
        me = self._generation
        steps = list(steps)
        inflight: Deque[StepPlan] = deque()
        self._inflight = inflight
        pos = 0
        try:
            while pos < len(steps) or inflight:
                if self._generation != me:
                    raise RuntimeError("this loader.epoch() iterator was superseded by a later loader.epoch() call "
                                       "on the same loader; iterate one epoch at a time")
                if self._pipe is None:
                    self._pipe = self._build()
                while pos < len(steps) and len(inflight) < self.prefetch:
                    plan = self.planner.plan(epoch, steps[pos])
                    try:
                        self._feed(self._pipe, plan)
                    except _UnreadableSample as e:  # nothing was fed: plan the step again without the file
                        self.planner.report_bad(e.file, e.reason)
                        log.warning("data: %s: %s; replaced by a stand-in", self.index.paths[e.file], e.reason)
                        continue
                    inflight.append(plan)
                    pos += 1
                try:
                    out = self._outputs(self._pipe)
                except Exception as e:  # noqa: BLE001 - a sample failed: find it, replace it, rerun
                    failed = list(inflight)
                    inflight.clear()
                    self._pipe = None
                    self._recover(failed, e)
                    pos = steps.index(failed[0].step)
                    continue
                plan = inflight.popleft()
                yield plan.step, self._to_torch(out), plan.files
        finally:
            if self._generation == me:
                self._abandon()

    def _abandon(self) -> None:
        """Collect the outputs of iterations still scheduled (an unfinished epoch), so the next starts clean."""
        n, self._inflight = len(self._inflight), deque()
        for _ in range(n):
            try:
                self._outputs(self._pipe)
            except Exception:  # noqa: BLE001 - a broken pipeline is rebuilt on the next run
                self._pipe = None
                return

    def _recover(self, plans: List[StepPlan], error: BaseException) -> None:
        culprits: List[Tuple[int, str]] = []
        for plan in plans:
            for j in range(len(plan.files)):
                if self._probe is None:
                    self._probe = self._build()
                try:
                    self._feed(self._probe, plan, [j])
                    self._outputs(self._probe)
                except Exception as e:  # noqa: BLE001
                    self._probe = None
                    culprits.append((int(plan.files[j]), _dali_error_summary(e)))
        if not culprits:
            raise RuntimeError(f"the {self.name} pipeline failed on steps {[p.step for p in plans]} but no single "
                               f"file reproduces the failure: {_dali_error_summary(error)}") from error
        culprits = [(f, why) for f, why in dict(culprits).items() if not self.planner.resolver.is_bad[f]]
        if not culprits:  # a failure that replacing files cannot fix: stop rather than retry forever
            raise RuntimeError(f"the {self.name} pipeline keeps failing on steps {[p.step for p in plans]}, only on "
                               f"files already replaced: {_dali_error_summary(error)}") from error
        for file, why in culprits:
            path = self.index.paths[file]
            try:
                load_rgb(path)
                decodable = True
            except Exception:  # noqa: BLE001
                decodable = False
            if decodable and file not in self._encoded and self._use_converted(file):
                log.warning("data: %s cannot decode %s (%s) but PIL can: using a PNG copy", self.name, path, why)
                continue
            self.planner.report_bad(file, f"decode failed ({self.name}): {why}")
            log.warning("data: %s: decode failed (%s); replaced by a stand-in", path, why)

    def close(self) -> None:
        self._pipe = None
        self._probe = None
