"""``vq plan``: a plan within its budget (measured bytes) that beats the best uniform setting
on the probe's own metric; the plan file; ``eval``/``generate`` taking it; the CLI."""

import json
import random

import mlx.core as mx
import pytest
from tiny_models import build

from vq_core import ArtifactError, make_cache
from vq_mlxlm.cli import build_parser, main
from vq_mlxlm.evaluation import parse_spec, run
from vq_mlxlm.evaluation.specs import CacheSpec
from vq_mlxlm.evaluation.text import EvalText
from vq_mlxlm.patch import patch, unpatch
from vq_mlxlm.planner import Plan, Target, load_plan, make_plan, save_plan
from vq_mlxlm.planner.probe import Probe
from vq_mlxlm.planner.search import layer_bytes

CONTEXT = 1024
SMALL = dict(prefix=128, scored=32, methods=("turboquant_mse",), key_widths=(2, 4))


def _uneven_model():
    """A 2-layer llama whose layer 0 has sharp attention (keys matter) and whose layer 1
    has a large output projection (values matter): one width for all layers is wasteful."""
    model = build("llama")
    a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    a0.k_proj.weight = a0.k_proj.weight * 6
    a0.q_proj.weight = a0.q_proj.weight * 6
    a1.o_proj.weight = a1.o_proj.weight * 8
    return model


@pytest.fixture(scope="module")
def tokens():
    rng = random.Random(0)
    return [rng.randrange(90) for _ in range(400)]


@pytest.fixture(scope="module")
def model():
    return _uneven_model()


def _measured_bytes(model, plan: Plan, context: int) -> int:
    """nbytes of the plan's caches, built by patch(), after ``context`` random tokens."""
    patch(model, **plan.patch_kwargs())
    try:
        caches = model.make_cache()
    finally:
        unpatch(model)
    heads = model.args.num_key_value_heads
    return sum(layer_bytes(c, heads, context, mx.float32) for c in caches)


def test_plan_at_a_byte_budget_fits_and_beats_uniform(model, tokens):
    heads = model.args.num_key_value_heads
    # room for one layer at 2/2 bits and one at 2/4 (and 1% to spare), so no single setting
    # for both layers fits but 2/2 bits
    budget = 1.01 * sum(
        layer_bytes(make_cache("turboquant_mse", head_dim=64, bits=2, value_bits=v), heads,
                    CONTEXT, mx.float32)
        for v in (2, 4)
    )  # fmt: skip
    budget = int(budget)
    plan = make_plan(
        model, tokens, Target(CONTEXT, nbytes=budget), value_widths=(2, 4), windows=(0,), **SMALL
    )
    assert _measured_bytes(model, plan, CONTEXT) <= budget
    assert plan.report["bytes"] <= budget
    best_uniform = plan.report["best_uniform"]
    assert best_uniform is not None and not plan.report["chose_uniform"]
    assert len(set(zip(plan.key_bits, plan.value_bits, strict=True))) > 1  # not uniform
    # re-measured on a fresh probe: the plan's KL is below the best uniform setting's
    probe = Probe(model, tokens, 128, 32)

    def kl(key_bits, value_bits):
        caches = [
            make_cache("turboquant_mse", head_dim=64, bits=k, value_bits=v, sink=1, seed=1000 * i)
            for i, (k, v) in enumerate(zip(key_bits, value_bits, strict=True))
        ]
        return probe.kl(caches)

    planned = kl(plan.key_bits, plan.value_bits)
    assert planned == pytest.approx(plan.report["kl"], rel=1e-4)
    assert planned < 0.8 * kl(best_uniform["key_bits"], best_uniform["value_bits"])


def test_plan_at_a_bits_target_and_its_window(model, tokens):
    plan = make_plan(
        model, tokens, Target(4096, bits=3.0), value_widths=(2, 4), windows=(0, 64), **SMALL
    )
    assert plan.report["bits_per_element"] <= 3.0
    assert plan.window in (0, 64)
    assert {c["window"] for c in plan.report["candidates"]} == {0, 64}
    assert plan.report["probe"]["kind"].startswith("calibration-free")
    tables = json.loads(json.dumps(plan.report["sensitivity"]))  # as a plan file holds them
    again = make_plan(
        model, tokens, Target(4096, bits=3.0), value_widths=(2, 4), windows=(0, 64), reuse=tables,
        **SMALL,
    )  # fmt: skip
    assert again.patch_kwargs() == plan.patch_kwargs()
    assert again.report["probe"]["kind"].endswith("(tables reused from an earlier plan)")
    with pytest.raises(ValueError, match="reused sensitivities"):
        make_plan(model, tokens, Target(4096, bits=3.0), value_widths=(2, 3), reuse=tables, **SMALL)


def test_plan_file_round_trip_and_refusals(model, tokens, tmp_path):
    plan = make_plan(
        model, tokens, Target(CONTEXT, bits=3.5), value_widths=(2,), windows=(0,), **SMALL
    )
    path = save_plan(plan, tmp_path / "plan.json")
    again = load_plan(path, plan.fingerprint)
    assert again.patch_kwargs() == plan.patch_kwargs()
    with pytest.raises(ArtifactError, match="another model"):
        load_plan(path, {**plan.fingerprint, "layers": 3})
    doc = json.loads(path.read_text())
    doc["plan"]["key_bits"][0] = 1
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="checksum"):
        load_plan(tmp_path / "edited.json")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ArtifactError, match="not a readable plan"):
        load_plan(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="exactly one"):
        Target(CONTEXT)
    with pytest.raises(ValueError, match="no setting"):
        make_plan(model, tokens, Target(64, bits=1.5), windows=(0,), **SMALL)


def test_eval_scores_a_plan_row(model, tokens, tmp_path):
    from test_eval_harness import TINY, CharTokenizer

    plan = make_plan(
        model, tokens, Target(CONTEXT, bits=3.0), value_widths=(2, 4), windows=(0,), **SMALL
    )
    path = str(save_plan(plan, tmp_path / "plan.json"))
    args = build_parser().parse_args(
        ["eval", "--methods", "exact", "--no-baselines", "--plan", path]
    )
    from vq_mlxlm.commands.eval import grid

    specs = grid(args)
    assert specs[-1] == CacheSpec(plan.method, round(sum(plan.key_bits) / 2, 2), plan=path)
    tok = CharTokenizer()
    text = EvalText("tiny", "0" * 64, tok.encode("the cache holds packed codes. " * 40))
    rows = run(model, tok, text, [specs[-1], parse_spec("turboquant_mse@2")], TINY)["rows"]
    plan_row = rows[1]
    assert plan_row["label"].endswith(f"+plan={path}")
    assert plan_row["compressed_layers"] == 2 and plan_row["kl"] > 0


CLI_PLAN = ["--prefix", "64", "--scored", "8", "--widths", "2,4", "--windows", "0",
            "--methods", "turboquant_mse", "--quiet"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["plan", "--bits", "3", "--out", "/does/not/exist/p.json"], "--out"),
        (["plan", "--bits", "3", "--methods", "nope", "--out", "p.json"], "--methods"),
        (["plan", "--bits", "3", "--methods", "comm_vq", "--out", "p.json"], "--methods"),
        (["plan", "--bits", "3", "--widths", "2,7", "--out", "p.json"], "--widths"),
        (["plan", "--bits", "30", "--out", "p.json"], "--bits"),
        (["plan", "--budget-mib", "1", "--window-fraction", "2", "--out", "p.json"], "--window"),
        (["generate", "--plan", "/does/not/exist.json"], "--plan"),
        (["eval", "--plan", "/does/not/exist.json"], "--plan"),
    ],
)
def test_bad_plan_flags_are_one_line(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err


def test_cli_plans_the_default_model_then_generates_with_it(tmp_path, capsys):
    """`vq plan` on the default model (a small probe), then `vq generate --plan`."""
    out = tmp_path / "plan.json"
    assert main(["plan", "--bits", "3", "--context", "4096", "--out", str(out), *CLI_PLAN]) == 0
    printed = capsys.readouterr().out
    assert "probe: calibration-free" in printed and "best uniform" in printed
    plan = load_plan(out)
    assert len(plan.key_bits) == 30 and plan.report["bits_per_element"] <= 3.0
    argv = ["generate", "--plan", str(out), "--max-tokens", "4", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == plan.method and result["bits"] == plan.key_bits


def test_plan_from_a_ratequant_table(model, tokens, tmp_path):
    """With calibration data (a RateQuant table) the plan uses its sensitivities and says so."""
    from test_eval_harness import WORDS, CharTokenizer

    from vq_mlxlm.calibration import calibrate
    from vq_mlxlm.planner.search import read_calibrated

    text = " ".join(WORDS.split() * 40)
    calibrate((model, CharTokenizer()), "ratequant", 3, text=text, out=tmp_path, progress=False,
              n_sequences=2, seq_len=64, probe_sequences=1)  # fmt: skip
    fingerprint = {"layers": 2, "kv_heads": 2, "head_dim": 64}
    table = read_calibrated(str(tmp_path), fingerprint)
    assert table.method == "turboquant_mse" and len(table.table) == 2
    plan = make_plan(
        model, tokens, Target(CONTEXT, bits=3.5), windows=(0,), prefix=128, scored=32,
        calibrated=table,
    )  # fmt: skip
    assert plan.report["probe"]["kind"].startswith("calibrated: RateQuant")
    assert plan.key_bits == plan.value_bits and set(plan.key_bits) <= set(table.widths)
    with pytest.raises(ArtifactError, match="another model"):
        read_calibrated(str(tmp_path), {**fingerprint, "layers": 3})
