"""Fine-tuning a DiT into a DyDiT (tinymodels/train_dydit.py): the gates, the FLOPs term, resuming.

A tiny diffusers DiT on the bundled data's 3 x 32 x 32 images (2 blocks, 2 heads, 16 tokens),
its own dense copy as the teacher: each case runs in a second or two.
"""
import pytest
import torch
from diffusers import DiTTransformer2DModel

from cachekit import apply_dydit
from cachekit.tinymodels.train_dydit import (MaskedDyDiT, Settings, Trainer, gate, initial_routers, lambda_at,
                                             router_shape)


def _tiny_dit(seed=0):
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
                                  num_layers=2, sample_size=32, patch_size=8, num_embeds_ada_norm=6,
                                  norm_type="ada_norm_zero")
    with torch.no_grad():                 # non-zero adaLN: blocks that do something (diffusers inits them so)
        for block in model.transformer_blocks:
            block.norm1.linear.weight.normal_(0, 0.05)
    for module in model.modules():        # as tinymodels.build_dit: the trainer drops labels itself (CFG)
        if hasattr(module, "dropout_prob") and hasattr(module, "embedding_table"):
            module.dropout_prob = 0.0
    return model


def _trainer(lam=0.3, seed=0, **kwargs):
    settings = Settings(lam=lam, batch=4, warmup=0, router_lr=kwargs.pop("router_lr", 0.5), mlp_groups=4,
                        log_every=1, seed=seed, **kwargs)
    return Trainer(settings, model=_tiny_dit(seed))


def test_gates_are_binary_forward_with_gradients_backward():
    logits = torch.linspace(-8, 8, 33, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    gates = gate(logits, training=True, generator=g)
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    assert 0 < gates.detach().mean() < 1
    (gates * torch.arange(1.0, 34.0)).sum().backward()
    assert logits.grad is not None and (logits.grad != 0).all()      # the soft sigmoid's gradient (STE)
    # Gumbel noise in training: the same logit is sometimes on, sometimes off.
    near_zero = torch.zeros(2000)
    assert 0.3 < gate(near_zero, training=True, generator=g).mean() < 0.7
    # Eval: sigmoid(logit) > 0.5, no noise.
    assert gate(torch.tensor([-0.1, 0.1]), training=False).tolist() == [0.0, 1.0]


def test_routers_start_with_every_gate_on():
    model = _tiny_dit()
    routers = initial_routers(router_shape(model, mlp_groups=4))
    masked = MaskedDyDiT(model, routers)
    x, t, y = torch.randn(4, 3, 32, 32), torch.tensor([999, 700, 300, 0]), torch.tensor([0, 1, 2, 6])
    with torch.no_grad():
        for training in (True, False):
            routers.train(training)
            model(x, timestep=t, class_labels=y)
            assert masked.flops_ratio().tolist() == [1.0] * 4
    masked.remove()


def test_the_flops_term_moves_the_ratio_toward_lambda():
    trainer = _trainer(lam=0.3)
    ratios = [trainer.step()["ratio"] for _ in range(12)]
    assert ratios[0] > 0.95
    assert max(ratios[-3:]) < 0.6                       # at or near 0.3 (the minimum here is 1/3: head 0, group 0)
    keep = _trainer(lam=1.0)                             # lambda 1: nothing to drop
    assert min(keep.step()["ratio"] for _ in range(6)) > 0.95


def test_the_loss_has_the_official_three_terms():
    trainer = _trainer(lam=0.5)
    parts = trainer.step()
    assert parts["loss"] == pytest.approx(parts["diffusion"] + parts["complete"] + parts["flops"], rel=1e-5)
    assert parts["flops"] == pytest.approx(2 * (parts["ratio"] - 0.5) ** 2, rel=1e-4)
    assert lambda_at(0, 0.5, 300) == 1.0 and lambda_at(300, 0.5, 300) == 0.5 and 0.5 < lambda_at(150, 0.5, 300) < 1


def test_a_checkpoint_resumes_exactly(tmp_path):
    path = tmp_path / "run.ckpt.pt"
    first = _trainer(lam=0.4)
    for _ in range(3):
        first.step()
    first.save_checkpoint(path)
    expected = first.step()
    resumed = _trainer(lam=0.4)
    resumed.resume(path)
    assert resumed.state["step"] == 3 and len(resumed.history) == 3
    got = resumed.step()
    assert got == expected
    for a, b in zip(first.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(first.ema_routers.parameters(), resumed.ema_routers.parameters()):
        assert torch.equal(a, b)
    other = Trainer(Settings(lam=0.7, batch=4, mlp_groups=4), model=_tiny_dit())
    with pytest.raises(ValueError, match="lambda 0.4"):
        other.resume(path)


def test_a_trained_tiny_dydit_runs_sliced_as_it_trained_masked():
    """What training computes (masked, eval gates) is what apply_dydit runs (sliced)."""
    trainer = _trainer(lam=0.3)
    for _ in range(10):
        trainer.step()
    model, routers = trainer.model.eval(), trainer.routers.eval()
    x, t, y = torch.randn(4, 3, 32, 32), torch.full((4,), 500), torch.tensor([6, 6, 1, 2])
    with torch.no_grad():
        trainer.masked.complete = False
        masked = model(x, timestep=t, class_labels=y, return_dict=False)[0]
        ratio = trainer.masked.flops_ratio().mean().item()
        trainer.masked.remove()
        handle = apply_dydit(model, routers, num_inference_steps=1)
        sliced = model(x, timestep=t, class_labels=y, return_dict=False)[0]
        handle.remove()
    assert ratio < 1.0                                    # something is dropped
    assert (sliced - masked).abs().max() <= 1e-5
