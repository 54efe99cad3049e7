"""Save → load into fresh objects → continue: bit-exact against an uninterrupted run."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch

from thermokfac import KFACPreconditioner

from .cases import kfac_step, mlp

V1 = Path(__file__).parent / "data" / "state_v1.pt"

BATCHES = [(torch.randn(16, 6, generator=torch.Generator().manual_seed(i)),
            torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(100 + i)))
           for i in range(7)]


def _fresh(config):
    model = mlp((6, 8, 4), dtype=torch.float32, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pre = KFACPreconditioner(model, optimizer=opt, factor_decay=0.9, inv_update_steps=3,
                             seed=7, **config)
    return model, opt, pre


def _train(model, opt, pre, batches, fisher):
    for x, y in batches:
        opt.zero_grad()
        kfac_step(pre, model(x), y, fisher)
        opt.step()


CONFIGS = [
    {"solver": "cholesky", "method": "solve"},
    {"solver": "cholesky", "method": "inverse"},
    {"solver": "eigh", "method": "solve", "damping_split": "pi"},
    {"solver": "cg", "method": "solve"},
    {"solver": "cholesky", "method": "solve", "fisher_type": "mc"},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_save_load_continue_is_bit_exact(config):
    fisher = config.get("fisher_type", "empirical")
    reference = _fresh(config)
    _train(*reference, BATCHES, fisher)

    first = _fresh(config)
    _train(*first, BATCHES[:4], fisher)
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(),
                "pre": first[2].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = _fresh(config)
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["pre"])
    _train(*resumed, BATCHES[4:], fisher)

    for p_ref, p_res in zip(reference[0].parameters(), resumed[0].parameters()):
        assert torch.equal(p_ref, p_res)
    assert resumed[2].steps == reference[2].steps == 7
    for name, (a, g) in reference[2].factors().items():
        a2, g2 = resumed[2].factors()[name]
        assert torch.equal(a, a2) and torch.equal(g, g2)


def test_checkpoint_from_other_model_names_layers():
    model, opt, pre = _fresh({})
    _train(model, opt, pre, BATCHES[:1], "empirical")
    other = mlp((6, 9, 4), dtype=torch.float32)
    other_pre = KFACPreconditioner(other, kl_clip=None)
    with pytest.raises(ValueError, match=r"factor shapes differ: 0 .*2 "):
        other_pre.load_state_dict(pre.state_dict())
    deeper = KFACPreconditioner(mlp((6, 8, 8, 4), dtype=torch.float32), kl_clip=None)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['4'\]"):
        deeper.load_state_dict(pre.state_dict())
    with pytest.raises(ValueError, match="format_version"):
        pre.load_state_dict({"layers": {}})
    with pytest.raises(ValueError, match="solver='cholesky'"):
        KFACPreconditioner(model, solver="eigh", kl_clip=None).load_state_dict(pre.state_dict())


@pytest.mark.parametrize("method", ["inverse", "solve"])
def test_float64_state_loads_into_a_float32_model(method):
    """The moving averages are cast to the new preconditioner's factor dtype (as
    ``torch.optim`` casts its state): the next steps run and match the float64 run to
    float32 precision."""
    runs = {}
    for dtype in (torch.float64, torch.float32):
        model = mlp((6, 8, 4), dtype=dtype, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        pre = KFACPreconditioner(model, optimizer=opt, method=method, inv_update_steps=2)
        runs[dtype] = (model, opt, pre)
    model64, opt64, pre64 = runs[torch.float64]
    _train(model64, opt64, pre64, [(x.double(), y) for x, y in BATCHES[:3]], "empirical")
    model32, opt32, pre32 = runs[torch.float32]
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    opt32.load_state_dict(opt64.state_dict())
    pre32.load_state_dict(pre64.state_dict())
    a, g = next(iter(pre32.factors().values()))
    assert a.dtype == g.dtype == torch.float32
    _train(model32, opt32, pre32, BATCHES[3:5], "empirical")
    _train(model64, opt64, pre64, [(x.double(), y) for x, y in BATCHES[3:5]], "empirical")
    for p32, p64 in zip(model32.parameters(), model64.parameters()):
        assert torch.allclose(p32.double(), p64, rtol=1e-4, atol=1e-5)


def test_a_state_with_wrong_tensor_shapes_is_refused_before_loading():
    model, opt, pre = _fresh({"solver": "cholesky", "method": "inverse"})
    _train(model, opt, pre, BATCHES[:4], "empirical")
    state = pre.state_dict()
    first = next(iter(state["layers"]))
    state["layers"][first]["g_inv"] = torch.zeros(3, 3)  # edited / damaged, shapes intact
    _, _, other = _fresh({"solver": "cholesky", "method": "inverse"})
    before = other.state_dict()
    with pytest.raises(ValueError, match=rf"{first}/g_inv has shape \(3, 3\); this model's "
                                         r"layer needs \(8, 8\)"):
        other.load_state_dict(state)
    after = other.state_dict()  # nothing was loaded
    assert after["steps"] == before["steps"] == 0


def test_a_state_from_another_thermodynamic_device_is_refused():
    from thermokfac.solvers import ThermodynamicSolver

    model, opt, pre = _fresh({"solver": ThermodynamicSolver(input_bits=8), "method": "solve"})
    _train(model, opt, pre, BATCHES[:2], "empirical")
    state = pre.state_dict()
    assert "input_bits" in state["solver_settings"]
    _, _, same = _fresh({"solver": ThermodynamicSolver(input_bits=8), "method": "solve"})
    same.load_state_dict(state)  # the same device loads
    _, _, other = _fresh({"solver": ThermodynamicSolver(input_bits=12), "method": "solve"})
    with pytest.raises(ValueError, match=r"another solver configuration: input_bits "
                                         r"\(checkpoint 8, this solver 12\)"):
        other.load_state_dict(state)


@pytest.mark.parametrize("name", ["solve", "inverse", "pi_eigh"])
def test_a_format_1_checkpoint_loads_and_continues_as_the_code_that_wrote_it(name):
    """``tests/data/state_v1.pt`` was written by the code before the block redesign
    (format version 1; ``tests/data/make_state_v1.py``): it loads, continues as that code
    continued (float64, to round-off across machines), and a save → load → continue
    across the two formats is bit-exact."""
    from .data import make_state_v1 as v1

    saved = torch.load(V1, weights_only=False)[name]
    assert saved["pre"]["format_version"] == 1

    def resumed():  # (a copy: loaded states share tensors with the dict, as torch.optim's)
        state = copy.deepcopy(saved)
        net, opt, pre = v1.build(v1.CONFIGS[name])
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        pre.load_state_dict(state["pre"])
        return net, opt, pre

    whole = resumed()
    v1.train(*whole, range(4, 7))
    for key, value in whole[0].named_parameters():
        torch.testing.assert_close(value, saved["params_at_7"][key], rtol=1e-12, atol=1e-14)
        assert not torch.equal(value, saved["model"][key])  # it trained

    first = resumed()
    v1.train(*first, range(4, 5))
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(),
                "pre": first[2].state_dict()}, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert again["pre"]["format_version"] == 2
    net, opt, pre = v1.build(v1.CONFIGS[name])
    net.load_state_dict(again["model"])
    opt.load_state_dict(again["opt"])
    pre.load_state_dict(again["pre"])
    v1.train(net, opt, pre, range(5, 7))
    for (key, value), (_, ref) in zip(net.named_parameters(), whole[0].named_parameters()):
        assert torch.equal(value, ref), key
    assert pre.steps == whole[2].steps == 7


def test_an_unknown_format_version_is_refused_naming_it():
    model, opt, pre = _fresh({})
    _train(model, opt, pre, BATCHES[:1], "empirical")
    state = {**pre.state_dict(), "format_version": 3}
    with pytest.raises(ValueError, match=r"format_version 3, expected one of \(1, 2\)"):
        pre.load_state_dict(state)


def test_format_1_migration_marks_the_blocks_that_code_had_prepared():
    """Format 1 kept no 'prepared' flag: one process prepared a layer that held a
    prepared state or an inverse, or had failed; the distributed code listed them."""
    from thermokfac.kfac.state import migrate

    empty = dict.fromkeys(("a", "g", "a_prep", "g_prep", "a_inv", "g_inv"))
    layers = {"x": {**empty, "failed": False}, "y": {**empty, "a_inv": torch.eye(2),
                                                      "failed": False},
              "z": {**empty, "failed": True}}
    one = migrate({"format_version": 1, "layers": layers})
    assert {n: s["prepared"] for n, s in one["layers"].items()} == {
        "x": False, "y": True, "z": True}
    ranks = migrate({"format_version": 1, "layers": layers,
                     "distributed": {"strategy": "mem-opt", "prepared_once": ["x"]}})
    assert {n: s["prepared"] for n, s in ranks["layers"].items()} == {
        "x": True, "y": False, "z": False}
    assert ranks["format_version"] == 2 and "distributed" not in ranks
    assert "prepared" not in layers["x"]  # the given state is left as it was


@pytest.mark.parametrize("config", [{"factor_update_steps": 2}, {"factor_update_steps": 2,
                                                                  "method": "inverse"}])
def test_a_checkpoint_saved_before_a_trainable_change_takes_effect_loads(config):
    """A bias frozen between two factor updates: the factors still have the bias column
    when the state is saved; it loads into the same model and continues exactly."""
    def build():
        model = mlp((6, 8, 4), dtype=torch.float64, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, opt, KFACPreconditioner(model, optimizer=opt, seed=7, **config)

    batches = [(x.double(), y) for x, y in BATCHES]
    whole, split = build(), build()
    for run in (whole, split):
        _train(*run, batches[:3], "empirical")
        run[0][0].bias.requires_grad_(False)  # next factor update: step 4
    saved = copy.deepcopy({"model": split[0].state_dict(), "opt": split[1].state_dict(),
                           "pre": split[2].state_dict()})
    resumed = build()
    resumed[0][0].bias.requires_grad_(False)
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["pre"])
    _train(*whole, batches[3:], "empirical")
    _train(*resumed, batches[3:], "empirical")
    for a, b in zip(whole[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    assert resumed[2].stats["trainable_changes"] == whole[2].stats["trainable_changes"] == 1


def test_a_loaded_state_is_copied_and_stats_stay_one_live_dict():
    """Later steps do not write into the loaded state dict (its tensors are copied),
    and ``pre.stats`` is one dict, restored in place."""
    model, opt, pre = _fresh({})
    _train(model, opt, pre, BATCHES[:4], "empirical")
    saved = pre.state_dict()
    frozen = copy.deepcopy(saved)
    model2, opt2, resumed = _fresh({})
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    handle = resumed.stats
    resumed.load_state_dict(saved)
    assert handle is resumed.stats and handle == pre.stats
    _train(model2, opt2, resumed, BATCHES[4:], "empirical")
    assert handle is resumed.stats
    assert handle["kl_clip_scale"] == resumed.last_report.kl_clip_scale < 1.0
    for name, layer in saved["layers"].items():
        for key, value in layer.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, frozen["layers"][name][key]), (name, key)
