"""The DyDiT's second stage (tinymodels/polish_dydit.py): teacher trajectories are the sampler's
own states, the loss is the guided one, the routers stay frozen and the gates are inference's.

A tiny diffusers DiT (2 blocks, 2 heads, 16 tokens) as teacher and student: each case takes seconds.
"""
import pytest
import torch

from cachekit.tinymodels.architectures import NULL_CLASS
from cachekit.tinymodels.polish_dydit import PolishSettings, Polisher, guided_loss, teacher_trajectories
from cachekit.tinymodels.sampling import make_scheduler
from cachekit.tinymodels.train_dydit import initial_routers, router_shape

from test_train_dydit import _tiny_dit

STEPS, CFG = 5, 3.0


@pytest.fixture(scope="module")
def data():
    return teacher_trajectories(_tiny_dit(1).eval(), 6, steps=STEPS, cfg=CFG, batch=4, progress=False)


def _routers(model, seed=0):
    """Routers with some gates off at every timestep (biases near 0, random weights)."""
    torch.manual_seed(seed)
    routers = initial_routers(router_shape(model, mlp_groups=4))
    with torch.no_grad():
        for block in routers.blocks:
            block.attn_rate.router.bias.fill_(0.0)
            block.mlp_rate.router.bias.fill_(0.0)
            block.token_selection.mlp_head[2].bias.fill_(0.0)
    return routers


def test_trajectories_are_the_teachers_guided_ddim_states(data):
    teacher = _tiny_dit(1).eval()
    assert data.x.shape == (6, STEPS, 3, 32, 32) and data.labels.shape == (6,)
    scheduler = make_scheduler(STEPS)
    assert torch.equal(data.timesteps, scheduler.timesteps)
    both = torch.cat([torch.full_like(data.labels, NULL_CLASS), data.labels])
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            x = data.x[:, i]
            eu, ec = teacher(torch.cat([x, x]), timestep=t.expand(12), class_labels=both, return_dict=False)[0].chunk(2)
            assert torch.allclose(eu, data.eps_uncond[:, i], atol=1e-5)
            assert torch.allclose(ec, data.eps_cond[:, i], atol=1e-5)
            if i + 1 < STEPS:
                step = scheduler.step(eu + CFG * (ec - eu), t, x).prev_sample
                assert torch.allclose(step, data.x[:, i + 1], atol=1e-5)
    other = teacher_trajectories(teacher, 6, steps=STEPS, cfg=CFG, batch=4, first_seed=5, progress=False)
    assert not torch.equal(other.x[:, 0], data.x[:, 0])                # the seeds decide the noise


def test_on_policy_states_follow_the_driver_and_keep_the_teachers_targets():
    teacher, driver = _tiny_dit(1).eval(), _tiny_dit(3).eval()
    data = teacher_trajectories(teacher, 3, steps=STEPS, cfg=CFG, batch=4, driver=driver, progress=False)
    scheduler = make_scheduler(STEPS)
    both = torch.cat([torch.full_like(data.labels, NULL_CLASS), data.labels])
    call = lambda m, x, t: m(torch.cat([x, x]), timestep=t.expand(6), class_labels=both, return_dict=False)[0].chunk(2)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps[:-1]):
            x = data.x[:, i]
            eu, ec = call(teacher, x, t)
            assert torch.allclose(eu, data.eps_uncond[:, i], atol=1e-5)
            du, dc = call(driver, x, t)
            step = scheduler.step(du + CFG * (dc - du), t, x).prev_sample
            assert torch.allclose(step, data.x[:, i + 1], atol=1e-5)


def test_the_guided_loss_weighs_the_guided_prediction_and_both_halves():
    target_u, target_c = torch.zeros(2, 3), torch.ones(2, 3)
    assert guided_loss(target_u, target_c, target_u, target_c, CFG).item() == 0.0
    # cond off by 1: the guided prediction is off by the scale (3), uncond not at all.
    loss = guided_loss(target_u, target_c + 1, target_u, target_c, CFG)
    assert loss.item() == pytest.approx(CFG ** 2 + 1.0)
    # uncond off by 1: the guided prediction is off by 1 - scale (-2).
    loss = guided_loss(target_u + 1, target_c, target_u, target_c, CFG)
    assert loss.item() == pytest.approx((1 - CFG) ** 2 + 1.0)


def test_polishing_trains_the_weights_under_fixed_inference_gates(data):
    model = _tiny_dit(2)
    routers = _routers(model)
    frozen = {k: v.clone() for k, v in routers.state_dict().items()}
    polisher = Polisher(PolishSettings(batch=4, lr=1e-3, cfg=CFG), model, routers, data)
    start = [p.detach().clone() for p in model.parameters()]
    # Inference's gates in training: the same input gives the same output (no Gumbel noise),
    # and some heads / groups / tokens are off.
    x, t, y = data.x[:2, 1], data.timesteps[1].expand(2), data.labels[:2]
    with torch.no_grad():
        first = model(x, timestep=t, class_labels=y, return_dict=False)[0]
        ratio = polisher.masked.flops_ratio().mean().item()
        again = model(x, timestep=t, class_labels=y, return_dict=False)[0]
    assert torch.equal(first, again) and ratio < 1.0
    losses = [polisher.step() for _ in range(25)]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters()))
    for key, value in routers.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert polisher.history and polisher.history[-1]["step"] == 20
    # The EMA copy carries no mask hooks of the live model (it was copied before hooking).
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in polisher.ema_model.modules())
    held = polisher.validation_loss(data)
    assert held > 0 and not any(m._forward_hooks or m._forward_pre_hooks for m in polisher.ema_model.modules())


def test_polish_writes_a_dydit_whose_routers_are_the_ones_it_started_from(tmp_path):
    """The whole stage on the bundled DyDiT, 2 iterations: files, record, routers unchanged."""
    import json

    from safetensors.torch import load_file

    from cachekit.tinymodels.polish_dydit import polish
    from cachekit.tinymodels.train_dydit import WEIGHTS, files
    source = files(0.5, WEIGHTS)
    settings = PolishSettings(lam=0.5, images=4, held_out=2, steps=5, batch=2)
    record = polish(settings, source=WEIGHTS, out=tmp_path, iterations=2, progress=False)
    written = files(0.5, tmp_path)
    assert all(written[k].is_file() for k in ("model", "routers", "record"))
    section = json.loads(written["record"].read_text())["polish"]
    assert section["steps"] == 2 and section == record["polish"]
    assert 0 < section["eval"]["flops_ratio"] < 1 and set(section["held_out_guided_loss"]) == {"before", "after"}
    assert json.loads(source["record"].read_text())["steps"] == record["steps"]    # the first stage's record kept
    before, after = load_file(str(source["routers"])), load_file(str(written["routers"]))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(FileNotFoundError, match="train_dydit.py"):
        polish(settings, source=tmp_path / "nothing", out=tmp_path / "o", iterations=1, progress=False)
