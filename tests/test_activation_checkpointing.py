"""engine.activation_checkpointing: the same loss and gradients as without (drop path on: the recomputed
forward must drop the same samples), under torch.compile too, and the saved activations shrink by the
share of the blocks that are checkpointed."""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from helpers import tiny_swin_config, tiny_vit_config
from simmim_fast import BatchMaskGenerator, SimMIM, load_config
from simmim_fast.models.checkpointing import checkpoint_every


def tiny_v2_config(**model):
    m = dict(encoder="swinv2", img_size=64, patch_size=4, embed_dim=16, depths=[2, 1, 2, 1], num_heads=[1, 2, 2, 4],
             window_size=4)
    m.update(model)
    return load_config({"model": m, "mask": {"mask_patch_size": 16, "mask_ratio": 0.6}})


MAKERS = {"swin": lambda **k: tiny_swin_config(depths=[2, 1, 2, 1], **k), "swinv2": tiny_v2_config,
          "vit": lambda **k: tiny_vit_config(depths=[4], **k)}


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.img_size
    images = torch.randn(b, 3, s, s, generator=g)
    return images, BatchMaskGenerator(s, cfg.mask.mask_patch_size, cfg.model.patch_size, 0.6)(b, generator=g)


def _loss_and_grads(model, images, mask, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(images, mask)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_config_values():
    assert [checkpoint_every(v) for v in (False, True, 1, 3)] == [0, 1, 1, 3]
    from simmim_fast.config import ConfigError
    with pytest.raises(ConfigError, match="engine.activation_checkpointing"):
        load_config({"engine": {"activation_checkpointing": 0}})
    with pytest.raises(ConfigError, match="engine.activation_checkpointing"):
        load_config({"engine": {"activation_checkpointing": "yes"}})
    model = SimMIM.from_config(tiny_v2_config())
    assert model.num_blocks == 6
    assert [model.set_activation_checkpointing(v).checkpointed_blocks() for v in (False, True, 2, 4, 9)] == [0, 6, 3, 2, 1]


@pytest.mark.parametrize("every", [True, 2])
@pytest.mark.parametrize("encoder", sorted(MAKERS))
def test_same_loss_and_grads_with_drop_path(encoder, every):
    cfg = MAKERS[encoder](drop_path_rate=0.5)
    torch.manual_seed(0)
    model = SimMIM.from_config(cfg).train()
    if encoder == "swinv2":  # res-post-norms start at 0 (no block output): give them weights
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".norm1.weight" in n or ".norm2.weight" in n:
                    p.fill_(1.0)
    images, mask = _batch(cfg)
    loss, grads = _loss_and_grads(model, images, mask, seed=11)
    other, _ = _loss_and_grads(model, images, mask, seed=12)
    assert other != loss  # drop path is live: another seed drops other samples
    model.set_activation_checkpointing(every)
    ck_loss, ck_grads = _loss_and_grads(model, images, mask, seed=11)
    torch.testing.assert_close(ck_loss, loss, rtol=0, atol=1e-6)
    assert ck_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(ck_grads[name], grads[name], rtol=1e-6, atol=1e-6, msg=name)


def test_recompute_without_the_rng_state_would_differ(monkeypatch):
    """The control for the test above: a recompute that does not restore the RNG state gives other
    gradients, so the equality there really comes from preserve_rng_state."""
    import simmim_fast.models.checkpointing as ckpt
    cfg = tiny_v2_config(drop_path_rate=0.5)
    torch.manual_seed(0)
    model = SimMIM.from_config(cfg).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".norm1.weight" in n or ".norm2.weight" in n:
                p.fill_(1.0)
    images, mask = _batch(cfg)
    _, grads = _loss_and_grads(model, images, mask, seed=11)
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: real(*a, **dict(k, preserve_rng_state=False)))
    model.set_activation_checkpointing(True)
    _, bad = _loss_and_grads(model, images, mask, seed=11)
    assert any(not torch.allclose(bad[n], grads[n]) for n in grads)


@pytest.mark.parametrize("encoder", ["swinv2"])  # swin runs the same stage loop (models/checkpointing.py)
def test_under_torch_compile(encoder):
    """Dynamo traces the checkpointed blocks (aot_eager: dynamo and AOT autograd, no C++ codegen)."""
    torch._dynamo.reset()
    cfg = MAKERS[encoder]()
    torch.manual_seed(0)
    model = SimMIM.from_config(cfg).train()
    images, mask = _batch(cfg)
    loss, grads = _loss_and_grads(model, images, mask, seed=1)
    model.set_activation_checkpointing(True)
    compiled = torch.compile(model, backend="aot_eager")
    c_loss, c_grads = _loss_and_grads(compiled, images, mask, seed=1)
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(c_grads["_orig_mod." + name] if "_orig_mod." + name in c_grads else c_grads[name],
                                   grads[name], rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while active, parameters excluded
    (ops save the weights they multiply by, which are no activation memory); with ``blocks``, also which
    block (forward pre/post hooks) was running when each was first saved."""

    def __init__(self, model, blocks=()):
        self.seen, self.total, self.per_block, self.current = set(), 0, {}, None
        self.seen |= {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()}
        self.hooks = []
        for i, blk in enumerate(blocks):
            self.hooks.append(blk.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "current", i)))
            self.hooks.append(blk.register_forward_hook(lambda m, a, o: setattr(self, "current", None)))

    def pack(self, t):
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in self.seen and st.nbytes() > 0:
            self.seen.add(key)
            self.total += st.nbytes()
            if self.current is not None:
                self.per_block[self.current] = self.per_block.get(self.current, 0) + st.nbytes()
        return t

    def measure(self, fn):
        with saved_tensors_hooks(self.pack, lambda t: t):
            out = fn()
        for h in self.hooks:
            h.remove()
        return out


def test_saved_activation_memory_falls_by_the_checkpointed_share():
    """Swin-B width (128, heads 4-8-16-32) at 192 px, one block per stage but two in the third: the
    bytes saved for backward at the end of the forward (the peak without checkpointing) fall by what the
    checkpointed blocks would have saved; a checkpointed block keeps only its input."""
    cfg = load_config({"model": dict(encoder="swinv2", img_size=192, embed_dim=128, depths=[1, 1, 2, 1],
                                     num_heads=[4, 8, 16, 32], window_size=12)})
    torch.manual_seed(0)
    model = SimMIM.from_config(cfg).train()
    images, mask = _batch(cfg, b=1)
    blocks = [blk for stage in model.encoder.layers for blk in stage.blocks]

    def saved(every):
        model.set_activation_checkpointing(every)
        meter = SavedBytes(model, blocks if not every else ())
        loss = meter.measure(lambda: model(images, mask))
        loss.backward()
        return meter

    off = saved(False)
    per_block = [off.per_block[i] for i in range(len(blocks))]
    outside = off.total - sum(per_block)
    assert sum(per_block) > 3 * outside  # the blocks hold most activations
    for every in (1, 2):
        expected = off.total - sum(b for i, b in enumerate(per_block) if i % every == 0)
        got = saved(every).total
        # what remains: the activations outside the blocks and what the next op saves of a block's output
        assert abs(got - expected) / off.total < 0.05, (every, got, expected, off.total)
    assert saved(True).total < 0.3 * off.total
