"""The cache's memory in the run record, checked against the tensors actually stored; video
latents (a [B, C, T, H, W] latent, SVD's frames-as-batch layout) keyed per stream and shape."""
from __future__ import annotations

import pytest
import torch

from cachekit.core.clock import StepClock
from cachekit.core.session import CacheSession
from cachekit.core.streams import CallLayout, StreamStore, input_signature
from cachekit.core.units import Unit, UnitMap, chain_readers

SIGMAS = [14.6, 7.0, 3.0, 1.0, 0.3, 0.0]
COND, UNCOND = (0, "u"), (1, "u")


class _Fixed:
    name = "fixed"

    def __init__(self, rows):
        self.rows = rows

    def plan(self, units, num_steps, window):
        return [list(r) for r in self.rows]


def _storage_bytes(values) -> int:
    """Bytes of distinct storages among `values` (computed here, independently of the runtime)."""
    storages = {}
    for t in values:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _chain_session(rows):
    # u0 -> u1 -> u2: u2 reads u1 only. A step that reuses u0 and u1 and computes u2 needs u1's
    # stored value and only a placeholder for u0 (DeepCache branch 0 in miniature).
    units = UnitMap("toy", tuple(Unit(f"u{i}", f"g{i}", "block") for i in range(3)), readers=chain_readers(3, {}))
    return CacheSession("owner-mem", units, _Fixed(rows), StepClock(SIGMAS[:len(rows) + 1]), range(len(rows)))


def _run_step(session, step, x, layout, weights):
    with session.call_scope(sigma=SIGMAS[step], layout=layout, samples=x.shape[0], call_input=x) as call:
        h = x
        for i, w in enumerate(weights):
            h = session.run_unit(call, i, lambda h=h, w=w: torch.tanh(h * w), h)
        return h


def test_run_record_memory_equals_the_bytes_of_the_stored_tensors(monkeypatch):
    rows = [[False] * 3, [True, True, False], [True, True, False], [False] * 3, [True, True, False]]
    session = _chain_session(rows)
    held: dict[int, torch.Tensor] = {}          # id(store) -> the value it holds, as put
    original_put = StreamStore.put

    def put(self, layout, signature, value):
        held[id(self)] = value
        return original_put(self, layout, signature, value)
    monkeypatch.setattr(StreamStore, "put", put)
    weights = [torch.tensor(1.1), torch.tensor(0.9), torch.tensor(1.2)]
    joint = CallLayout((COND, UNCOND))
    peak = 0
    x = torch.randn(2, 4, 6, 6)
    for step in range(len(rows)):
        x = _run_step(session, step, x, joint, weights)
        now = _storage_bytes(held.values())
        assert session.cache_bytes() == now
        peak = max(peak, now)
    # Only u1 is stored (u2 reads it on the cache steps): one [2, 4, 6, 6] float32 tensor.
    assert len(held) == 1 and now == 2 * 4 * 6 * 6 * 4
    telemetry = session.close()
    assert telemetry.cache_bytes == peak == now
    assert telemetry.cache_bytes_end == now
    # u0 is reused but read by nothing computed: a placeholder of its shape, one element held.
    assert telemetry.placeholder_bytes == 4
    assert session.cache_bytes() == 0 and session.placeholder_bytes() == 0
    record = telemetry.as_dict(resolve=False)
    assert record["cache_bytes"] == record["cache_bytes_end"] == now
    assert "cache 1.1 KiB peak" in telemetry.summary()


def test_peak_and_end_differ_when_a_smaller_input_replaces_the_stored_value(monkeypatch):
    rows = [[False] * 3, [True, True, False], [False] * 3, [True, True, False]]
    session = _chain_session(rows)
    weights = [torch.tensor(1.1), torch.tensor(0.9), torch.tensor(1.2)]
    single = CallLayout((COND,))
    _run_step(session, 0, torch.randn(1, 4, 8, 8), single, weights)
    big = session.cache_bytes()
    _run_step(session, 1, torch.randn(1, 4, 8, 8), single, weights)
    _run_step(session, 2, torch.randn(1, 4, 4, 4), single, weights)     # another shape: replaces it
    small = session.cache_bytes()
    _run_step(session, 3, torch.randn(1, 4, 4, 4), single, weights)
    telemetry = session.close()
    assert big == 4 * 8 * 8 * 4 and small == 4 * 4 * 4 * 4
    assert telemetry.cache_bytes == big and telemetry.cache_bytes_end == small


def test_video_latent_keys_per_stream_and_frame_count():
    store = StreamStore()
    joint = CallLayout((COND, UNCOND))
    # A 5-D video latent [B, C, T, H, W] (Wan, HunyuanVideo, LTX): cond and uncond batched.
    x3 = torch.randn(2, 16, 3, 8, 8)
    out3 = torch.randn(2, 16, 3, 8, 8)
    store.put(joint, input_signature(x3, joint), out3)
    cond = CallLayout((COND,))
    assert torch.equal(store.get(cond, input_signature(x3[:1], cond)), out3[:1])
    assert torch.equal(store.get(CallLayout((UNCOND,)), input_signature(x3[1:], cond)), out3[1:])
    # Another frame count never gets the 3-frame value.
    x5 = torch.randn(1, 16, 5, 8, 8)
    assert input_signature(x5, cond) != input_signature(x3[:1], cond)
    assert store.get(cond, input_signature(x5, cond)) is None


def test_svd_frames_as_batch_split_per_stream():
    # SVD: the batch is the frames, [T, C, H, W] per stream; a joint call carries [2T, ...] with
    # cond_or_uncond = [1, 0]: each stream's entry is its own T frames.
    store = StreamStore()
    frames = 4
    joint = CallLayout((UNCOND, COND))
    x = torch.randn(2 * frames, 8, 8, 8)
    out = torch.randn(2 * frames, 32, 8, 8)
    signature = input_signature(x, joint)
    assert signature[0] == frames
    store.put(joint, signature, out)
    cond = CallLayout((COND,))
    assert torch.equal(store.get(cond, input_signature(x[frames:], cond)), out[frames:])
    assert torch.equal(store.get(CallLayout((UNCOND,)), input_signature(x[:frames], cond)), out[:frames])
    # 3 frames: another signature, nothing reused.
    assert store.get(cond, input_signature(torch.randn(3, 8, 8, 8), cond)) is None


def test_two_frame_counts_in_one_session_never_reuse_each_other():
    rows = [[False] * 3, [True, True, False], [True, True, False]]
    session = _chain_session(rows)
    weights = [torch.tensor(1.1), torch.tensor(0.9), torch.tensor(1.2)]
    single = CallLayout((COND,))
    a, b = torch.randn(3, 4, 6, 6), torch.randn(2, 4, 6, 6)
    _run_step(session, 0, a, single, weights)
    _run_step(session, 0, b, single, weights)          # same step, 2 frames: replaces the 3-frame entry
    out = _run_step(session, 1, a, single, weights)    # 3 frames again: recomputed, not the 2-frame value
    assert out.shape == a.shape
    assert session.telemetry.reused[1] == [0, 0, 0]
    _run_step(session, 2, a, single, weights)          # now stored for 3 frames: reused
    assert session.telemetry.reused[2][:2] == [3, 3]
    session.close()


def test_placeholders_hold_one_element_unless_the_host_edits_outputs_in_place():
    rows = [[False] * 3, [True, True, False], [True, True, False]]
    weights = [torch.tensor(1.1), torch.tensor(0.9), torch.tensor(1.2)]
    layout = CallLayout((COND, UNCOND))
    handed = {}
    for protect in (False, True):
        session = _chain_session(rows)
        x = torch.randn(2, 4, 6, 6)
        for step in range(len(rows)):
            with session.call_scope(sigma=SIGMAS[step], layout=layout, samples=2, call_input=x,
                                    protect=protect) as call:
                h = x
                for i, w in enumerate(weights):
                    h = session.run_unit(call, i, lambda h=h, w=w: torch.tanh(h * w), h)
                    if i == 0 and step > 0:
                        handed[protect] = h
        telemetry = session.close()
        placeholder = handed[protect]
        assert placeholder.shape == (2, 4, 6, 6)
        if protect:       # ControlNet-style glue writes into it: a real tensor of its own
            assert telemetry.placeholder_bytes == 2 * 4 * 6 * 6 * 4
            placeholder += 1
        else:
            assert telemetry.placeholder_bytes == 4 and placeholder.stride() == (0, 0, 0, 0)
            assert torch.cat([placeholder, placeholder], 1).abs().sum() == 0     # glue reads zeros
            with pytest.raises(RuntimeError):
                placeholder += 1


def test_a_write_into_a_placeholder_is_named_as_an_undetected_in_place_edit():
    from cachekit.core.session import UndetectedInPlaceEdit
    rows = [[False] * 3, [True, True, False]]
    session = _chain_session(rows)
    weights = [torch.tensor(1.1), torch.tensor(0.9), torch.tensor(1.2)]
    x = torch.randn(2, 4, 6, 6)
    _run_step(session, 0, x, CallLayout((COND, UNCOND)), weights)
    with pytest.raises(UndetectedInPlaceEdit, match="bypass that node"):
        with session.call_scope(sigma=SIGMAS[1], layout=CallLayout((COND, UNCOND)), samples=2, call_input=x) as call:
            h = session.run_unit(call, 0, lambda: torch.tanh(x), x)
            h += 1                                      # a glue edit nobody declared
    session.close()
