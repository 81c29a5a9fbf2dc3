"""A small-scale replication of the RetNet paper's comparison with the Transformer, one part per device call.

    python -m experiments.replicate --part=corpus --out_dir=$OUT                 # corpus, tokenizer, sizes
    python -m experiments.replicate --part=plan --size=s,m,l                      # budgets, no device needed
    python -m experiments.replicate --part=calibrate --size=s,m,l --out_dir=$OUT # step times → token budgets
    python -m experiments.replicate --part=train --arch=retnet,transformer --size=s --out_dir=$OUT
    python -m experiments.replicate --part=train --arch=retnet --size=m --out_dir=$OUT
    python -m experiments.replicate --part=mqar --mqar_size=s,m --out_dir=$OUT
    python -m experiments.replicate --part=mqar --mqar_setup=small --mqar_size=xs     # an easier task, CPU
    python -m experiments.replicate --part=train --arch=retnet --size=s-k128 --out_dir=$OUT  # wider heads
    python -m experiments.replicate --part=train --arch=retnet,transformer --size=s-lr3e-3 --out_dir=$OUT
    python -m experiments.replicate --part=report                                 # here: tables and plots
    python -m experiments.replicate --smoke --part=corpus,calibrate,train,mqar,report  # all of it, CPU, toy
                                             # (results under --work_dir/smoke unless --results_dir is given)

Each part writes small JSON files to ``--out_dir`` (default ``--results_dir``,
experiments/results/replication): ``corpus.json`` and ``tokenizer.json``, ``calibrate.json``,
``train_{arch}_{size}.json``, ``mqar_{arch}_{size}.json``. Later parts read the tokenizer, the
calibration and earlier runs' budgets from ``--results_dir``, so copy each call's files there before the
next call; ``report`` merges them into ``experiments/results/replication_{device}_{date}.md`` with PNG
plots. The sizes, recipe and budgets are in ``experiments/replication/recipe.py``.

Start-up of every LM part on a fresh machine: the corpus is rebuilt from its site-packages (``--roots``;
12 s on the H200 machine) and tokenized once into arrays (``replication/tokens.py``; the corpus part
counted the same 99M tokens in 49 s there, on all 16 cores), before any run's clock starts. Tokenizing
while training instead would need 2–3M tokens/s at size s (112–142 MFLOP a token at 40% of 790 TFLOP/s)
from grain workers that make about 0.4M a CPU-second each. Each result records its call's ``startup``.

Every run trains on the same tokens whatever its size (``--tokens``, default ``recipe.STUDY_TOKENS``:
100M, what the largest size's slower architecture trains in one call), as the paper compares its sizes.
``--tokens=0`` gives each size its own budget instead: what its slower architecture trains in
``--train_seconds`` / 1.1 (``schedule.MARGIN``) at the speed ``--part=calibrate`` measured (20 s a
configuration); a size's runs then train on the budget that its first finished run recorded, and a run that
a deadline stops (``truncated``) sets no budget (its speed, if lower, replaces the calibration's).
Calibration and runs step through one loop (``replication/loop.py``: the next batch sent to the device
while a step runs, metrics read on the host a log point late, no wait in the step path); each records its
loop's ``host`` time (making and sending batches, dispatching steps, waiting for metrics) and its tokens/s
over the run (``loop.speed``).

Several runs in one train call (``--arch=retnet,transformer``) run one after another in the call's
``--time_limit_s``; a run that raises is recorded as failed and the next one still runs; before each
later run the call checks that it fits the time left (``replication/schedule.py``: set-up, training at
the calibrated speed, measurements, with a 10% margin) and otherwise leaves it out with a line
``NOT RUN: ...``, since a run cut short by the deadline compares with nothing.

Device schedule (one H200; GPU time in blocks of 30 minutes, a machine's start of ~2 minutes included;
one command at most 10 minutes; each command below is one call with ``--out_dir=$OUT``; minutes from
``--part=plan`` with the calibration of 2026-12-02 (s 685K, m 384K, l 272K tokens/s for the slower
architecture), 54 s of start-up a call (a later call on the same machine reuses the tokens: ~2 s), 40 s
of measurements a run; 100M tokens a run):

| block | command | expected minutes |
|---|---|---|
| done | ``--part=corpus`` | 1.3 (measured) |
| done | ``--part=calibrate --size=s,m,l`` | 4.7 (measured) |
| done | ``--part=train --arch=retnet,transformer --size=s`` | ~7.2 |
| done | ``--part=train --arch=retnet --size=m`` | ~6.2 |
| done | ``--part=train --arch=transformer --size=m`` | ~5.2 |
| done | ``--part=train --arch=retnet --size=l`` | ~8.0 (7.7 measured) |
| done | ``--part=train --arch=transformer --size=l`` | ~7.1 (6.2 measured) |
| done | ``--part=mqar --mqar_size=s,m`` | 7.1 measured (split over two calls) |
| 3 | ``--part=train --arch=retnet --size=s-k128`` | ~4 |
| 3 | ``--part=train --arch=retnet --size=m-k128`` | ~6 |
| 4 | ``--part=train --arch=retnet,transformer --size=s-lr3e-3`` | ~7.2 |
| 4 | ``--part=train --arch=retnet,transformer --size=s-lr3e-4`` | ~7.2 |
| – | ``--part=report`` (no GPU) | |

Between commands: copy ``$OUT/*.json`` into experiments/results/replication/. ``--part=plan
--size=s,m,l`` (no GPU; it plans for calibrate.json's device) prints the minutes above. MQAR writes each
architecture and size as it finishes; if the command reaches its limit, rerun the missing size alone
(``--mqar_size=m``).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import re
import sys
import time
import traceback
from typing import Any

_STARTED = time.perf_counter()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.replication import data, lm, loop, recall, recipe, report, schedule, tokens  # noqa: E402
from retnet_jax.training import code_corpus  # noqa: E402
from retnet_jax.training import flops as flops_lib  # noqa: E402
from retnet_jax.training.trainer import model_vocab_size  # noqa: E402

PARTS = ("corpus", "plan", "calibrate", "train", "mqar", "report")
RESULTS_DIR = os.path.join("experiments", "results", "replication")

_PART = flags.DEFINE_list("part", None, f"What to run, in order: any of {PARTS}.", required=True)
_ARCH = flags.DEFINE_list("arch", list(recipe.ARCHS), "Architectures: retnet, transformer.")
_SIZE = flags.DEFINE_list("size", ["s"], f"Language-model sizes: {sorted(recipe.LM_SIZES)}.")
_MQAR_SIZE = flags.DEFINE_list("mqar_size", ["s", "m"], f"MQAR sizes: {sorted(recipe.MQAR_SIZES)}.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Toy sizes everywhere (the pipeline on a CPU in seconds).")
_RESULTS_DIR = flags.DEFINE_string("results_dir", RESULTS_DIR, "Where earlier parts' results are read from.")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where this call's results go (default: --results_dir).")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", "/tmp/retnet_replication", "Corpus and tfds builds (not results)."
)
_ROOTS = flags.DEFINE_list("roots", [], "Folders of Python source for the corpus (default: site-packages).")
_VALIDATION_FRACTION = flags.DEFINE_float(
    "validation_fraction", 0.05, "Share of the corpus's bytes held out."
)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Entries of the byte-level BPE (smoke: 300).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "A tokenizer.json (default: RESULTS_DIR/tokenizer.json).")
_TOKENS = flags.DEFINE_integer(
    "tokens",
    recipe.STUDY_TOKENS,
    "Training tokens of every run, whatever its size (0: each size what its slower architecture trains in "
    "--train_seconds, from calibrate.json or the estimate).",
)
_TRAIN_SECONDS = flags.DEFINE_float(
    "train_seconds", 300.0, "Training time a size's token budget is sized for."
)
_TOKENS_PER_PARAM = flags.DEFINE_float(
    "tokens_per_param", 20.0, "Cap of the budget, per non-embedding weight."
)
_MFU = flags.DEFINE_float("mfu", 0.4, "Utilization assumed by the budget estimate without a calibration.")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", 790.0, "bf16 matrix rate of the estimate (H200: ~790 measured)."
)
_TIME_LIMIT_S = flags.DEFINE_float("time_limit_s", 560.0, "Wall-clock limit of the call, from start-up.")
_RESERVE_S = flags.DEFINE_float("reserve_s", 110.0, "Time kept after training for the final measurements.")
_MQAR_SETUP = flags.DEFINE_enum(
    "mqar_setup",
    "full",
    [n for n in recipe.MQAR_SETUPS if n != "smoke"],
    "MQAR data and training: full (Zoology's task) or small (an easier one for a CPU, at --mqar_size=xs).",
)
_MQAR_STEPS = flags.DEFINE_integer("mqar_steps", 0, "MQAR training steps (0: the set-up's).")
_MQAR_LRS = flags.DEFINE_list("mqar_lrs", [], "MQAR learning rates (default: the set-up's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of initialization and data order (the same for every run).")
_REPORT_DIR = flags.DEFINE_string(
    "report_dir", os.path.join("experiments", "results"), "Where the report goes."
)
_DATE = flags.DEFINE_string("date", "", "Date in the report's name (default: today).")


def log(text: str) -> None:
    print(text, flush=True)


def _out_dir() -> str:
    return _OUT_DIR.value or _results_dir()


def _results_dir() -> str:
    """``--results_dir``; with ``--smoke`` and no ``--results_dir``, a folder under ``--work_dir`` (so that a
    toy run never overwrites the study's results)."""
    if _SMOKE.value and not flags.FLAGS["results_dir"].present:
        return os.path.join(_WORK_DIR.value, "smoke", "results")
    return _RESULTS_DIR.value


def _report_dir() -> str:
    if _SMOKE.value and not flags.FLAGS["report_dir"].present:
        return os.path.join(_WORK_DIR.value, "smoke", "reports")
    return _REPORT_DIR.value


def _device() -> dict[str, Any]:
    device = jax.devices()[0]
    short = "cpu" if device.platform == "cpu" else None
    for name in flops_lib.PEAK_BF16:
        if short is None and name.lower() in device.device_kind.lower():
            short = name.replace(" ", "")
    return dict(
        platform=device.platform,
        device_kind=device.device_kind,
        short=short or re.sub(r"[^A-Za-z0-9]+", "", device.device_kind),
        device_count=jax.device_count(),
        jax_version=jax.__version__,
    )


def write_json(name: str, payload: dict[str, Any]) -> str:
    out = _out_dir()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    record = dict(
        command="python -m experiments.replicate " + " ".join(sys.argv[1:]),
        date=datetime.date.today().isoformat(),
        device=_device(),
        call_elapsed_s=time.perf_counter() - _STARTED,  # since start-up: what a device call spent so far
        **payload,
    )
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    log(f"wrote {path}")
    return path


def _read_result(name: str) -> dict[str, Any] | None:
    for folder in dict.fromkeys([_results_dir(), _out_dir()]):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


def _roots() -> list[str]:
    return _ROOTS.value or code_corpus.site_packages_roots()


def _vocab_size() -> int:
    return 300 if _SMOKE.value and _VOCAB_SIZE.value == 8192 else _VOCAB_SIZE.value


def _lm_sizes() -> list[str]:
    return ["smoke"] if _SMOKE.value else _SIZE.value


_STARTUP: dict[str, Any] = {}  # what this call's start-up cost (recorded with every run)


def _prepare() -> tuple[Any, lm.Options]:
    """The corpus (built if missing), the tokenizer and the tokenized corpus; the options every LM part
    shares. The first call in a process pays the start-up; later ones reuse what is in ``--work_dir``."""
    work_dir = _WORK_DIR.value
    stats, build_s = data.ensure_corpus(work_dir, _roots(), _VALIDATION_FRACTION.value, log)
    candidates = [
        _TOKENIZER.value,
        os.path.join(_results_dir(), data.TOKENIZER_FILE),
        os.path.join(_out_dir(), data.TOKENIZER_FILE),
        os.path.join(work_dir, data.TOKENIZER_FILE),
    ]
    tokenizer, path = data.ensure_tokenizer(candidates, work_dir, _vocab_size(), log)
    recorded = _read_result(data.CORPUS_FILE)
    if recorded and recorded["corpus"]["fingerprint"] != stats.fingerprint:
        log("WARNING: this corpus differs from the one corpus.json describes (another site-packages?).")
    digest = data.tokenizer_digest(tokenizer)
    arrays, manifest = tokens.ensure_tokens(
        work_dir,
        data.corpus_dir(work_dir),
        stats.fingerprint,
        tokenizer,
        digest,
        model_vocab_size(tokenizer),
        log,
    )
    if not _STARTUP:
        _STARTUP.update(
            corpus_build_s=build_s,
            tokenize_s=manifest["seconds"],
            tokens=manifest["tokens"],
            ready_s=time.perf_counter() - _STARTED,  # the whole start-up, process start included
        )
    options = lm.Options(
        work_dir=work_dir,
        tokenizer_path=os.path.abspath(path),
        corpus_fingerprint=stats.fingerprint,
        tokenizer_digest=digest,
        deadline=_call_end() - _RESERVE_S.value,
        seed=_SEED.value,
        corpus_tokens=arrays,
    )
    return tokenizer, options


def _call_end() -> float:
    """The ``time.perf_counter()`` value by which the call must be done."""
    return _STARTED + _TIME_LIMIT_S.value


def part_corpus() -> None:
    start = time.perf_counter()
    stats, build_s = data.ensure_corpus(_WORK_DIR.value, _roots(), _VALIDATION_FRACTION.value, log)
    clock = time.perf_counter()
    tokenizer = data.train_tokenizer(data.corpus_dir(_WORK_DIR.value), _vocab_size())
    tokenizer_s = time.perf_counter() - clock
    data.save_tokenizer(tokenizer, _out_dir())
    data.save_tokenizer(tokenizer, _WORK_DIR.value)
    clock = time.perf_counter()
    result = data.corpus_report(
        stats, tokenizer, data.corpus_dir(_WORK_DIR.value), dict(build_s=build_s, tokenizer_s=tokenizer_s)
    )
    result["seconds"].update(count_s=time.perf_counter() - clock, total_s=time.perf_counter() - start)
    write_json(data.CORPUS_FILE, result)
    log(f"tokens: train {result['tokens']['train']:,}, validation {result['tokens']['validation']:,}")


def part_calibrate() -> None:
    tokenizer, options = _prepare()
    previous = _read_result("calibrate.json")
    runs = (
        previous["runs"] if previous and previous["device"]["device_kind"] == _device()["device_kind"] else {}
    )
    for size_name in _lm_sizes():
        size = recipe.LM_SIZES[size_name]
        runs[size_name] = {}
        for arch in _ARCH.value:
            log(f"calibrating {arch} {size_name}")
            try:
                runs[size_name][arch] = lm.calibrate(size, arch, tokenizer, options)
            except Exception as error:  # noqa: BLE001 — recorded, and the next configuration runs
                runs[size_name][arch] = _failure(error)
            log(f"  {json.dumps({k: v for k, v in runs[size_name][arch].items() if k != 'traceback'})[:400]}")
    write_json("calibrate.json", dict(runs=runs, train_seconds=_TRAIN_SECONDS.value, startup=_STARTUP))


def _failure(error: BaseException) -> dict[str, Any]:
    text = f"{type(error).__name__}: {error}"
    status = "OOM" if re.search(r"RESOURCE_EXHAUSTED|out of memory", text) else "error"
    log(f"  -> {status}: {text[:300]}")
    return dict(status=status, error=text[:4000], traceback=traceback.format_exc()[-4000:])


def _corpus_tokens(options: lm.Options | None) -> int | None:
    """Training tokens of the corpus: corpus.json's (the same in every call), else this call's count."""
    recorded = _read_result(data.CORPUS_FILE)
    if recorded:
        return recorded["tokens"]["train"]
    if options is not None and options.corpus_tokens is not None:
        return len(options.corpus_tokens["train"].tokens)
    return None


_PLAN_FOR: dict[str, str] = {}  # set by --part=plan: the device kind it plans for


def _target_kind() -> str:
    """The device kind whose calibration and runs set the budgets: this machine's, except in
    ``--part=plan``, which runs anywhere and plans for the device that calibrate.json measured."""
    return _PLAN_FOR.get("device_kind") or _device()["device_kind"]


def _this_loop(record: dict[str, Any]) -> bool:
    """Whether ``record`` (a calibration or a run) was timed with this version of the training loop."""
    return (record.get("loop") or {}).get("version") == loop.LOOP_VERSION


def _calibration(size_name: str) -> dict[str, Any]:
    """calibrate.json's runs of a size (of its base size, for a head ablation: the nearest measured speed),
    if it was measured on this kind of device with this training loop and both runs succeeded."""
    calibration = _read_result("calibrate.json")
    runs = (calibration or {}).get("runs", {}).get(recipe.base_size(size_name), {})
    same_device = calibration and calibration["device"]["device_kind"] == _target_kind()
    usable = all(runs.get(a, {}).get("status") == "ok" and _this_loop(runs[a]) for a in recipe.ARCHS)
    return runs if same_device and usable else {}


def _measured_speeds(size_name: str) -> dict[str, float]:
    """Tokens/s that earlier runs of a size (finished or stopped at their deadline) reached over their
    whole training, on this kind of device with this loop: a longer measurement than the calibration's."""
    speeds = {}
    for arch in recipe.ARCHS:
        run = _read_result(f"train_{arch}_{size_name}.json")
        if (
            run
            and run.get("status") == "ok"
            and run.get("tokens_per_s")
            and _this_loop(run)
            and run["device"]["device_kind"] == _target_kind()
        ):
            speeds[arch] = run["tokens_per_s"]
    return speeds


def budget(size_name: str, vocab_size: int, options: lm.Options) -> dict[str, Any]:
    """The steps and tokens of a size's runs, the same for both architectures: ``--tokens`` (the study's, for
    every size), or with ``--tokens=0`` what the slower one trains in ``--train_seconds``
    (recipe.token_budget); with each architecture's expected tokens/s and training seconds."""
    size = recipe.LM_SIZES[size_name]
    params = lm.non_embedding_params(size, vocab_size, options)
    corpus_tokens = _corpus_tokens(options)
    runs = _calibration(size_name)
    if runs:
        speeds = {a: runs[a]["tokens_per_s"] for a in recipe.ARCHS}
        basis = f"calibration: {min(speeds.values()):,.0f} tokens/s (the slower architecture)"
    else:
        flops = {a: lm.flops_per_token(size, a, vocab_size, options) for a in recipe.ARCHS}
        rate = _MFU.value * _PEAK_TFLOPS.value * 1e12 * jax.device_count()
        speeds = {a: rate / f for a, f in flops.items()}
        basis = (
            f"estimate: {max(flops.values()) / 1e6:.0f} MFLOP/token at {_MFU.value:.0%} of "
            f"{_PEAK_TFLOPS.value:g} TFLOP/s"
        )
    slower = {a: v for a, v in _measured_speeds(size_name).items() if v < speeds[a]}
    if slower:  # a run's whole training is the longer measurement: the budget must fit its speed
        speeds.update(slower)
        basis = f"measured by an earlier run of the size: {min(speeds.values()):,.0f} tokens/s (not {basis})"
    if size.fixed_steps or _TOKENS.value:
        steps = size.fixed_steps or max(1, _TOKENS.value // size.step_tokens)
        tokens = steps * size.step_tokens
        limited_by = "the size's fixed steps" if size.fixed_steps else "the study's tokens (--tokens)"
        result = dict(
            steps=steps,
            tokens=tokens,
            tokens_per_param=tokens / params,
            epochs=tokens / corpus_tokens if corpus_tokens else None,
            limited_by=limited_by,
        )
        basis = f"{limited_by}; speeds: {basis}"
    else:
        result = recipe.token_budget(
            params=params,
            step_tokens=size.step_tokens,
            tokens_per_second=min(speeds.values()),
            train_seconds=_TRAIN_SECONDS.value,
            tokens_per_param=_TOKENS_PER_PARAM.value,
            corpus_tokens=corpus_tokens,
            margin=schedule.MARGIN,
        )
        basis += f"; {_TRAIN_SECONDS.value:g} s / margin {schedule.MARGIN:g}"
    return dict(
        **result,
        basis=basis,
        train_seconds=_TRAIN_SECONDS.value,
        max_epochs=recipe.MAX_EPOCHS,
        speeds=speeds,
        expected_train_s={a: result["tokens"] / v for a, v in speeds.items()},
    )


def size_budget(size_name: str, vocab_size: int, options: lm.Options) -> dict[str, Any]:
    """The budget of a size's runs: the one a finished run of the size recorded (so that runs of one size in
    different calls train on the same tokens, whatever calibrate.json says meanwhile), else ``budget``. A
    run stopped by its deadline (``truncated``) sets no budget; its measured speed lowers the next one."""
    if not (_TOKENS.value or recipe.LM_SIZES[size_name].fixed_steps):
        for arch in recipe.ARCHS:
            run = _read_result(f"train_{arch}_{size_name}.json")
            if (
                run
                and run.get("status") == "ok"
                and not run.get("truncated")  # a run cut short compares with nothing: no budget from it
                and run["device"]["device_kind"] == _target_kind()
            ):
                fresh = budget(size_name, vocab_size, options)
                recorded = dict(
                    run["budget"],
                    basis=f"as the {arch} run of {run['date']} recorded (delete its result for a new budget)",
                    speeds=fresh["speeds"],
                    expected_train_s={a: run["budget"]["tokens"] / v for a, v in fresh["speeds"].items()},
                )
                return recorded
    return budget(size_name, vocab_size, options)


def _run_time(size_name: str, arch: str, plan: dict[str, Any], measured: dict[str, float] | None = None):
    """A run's expected seconds: calibrate.json's set-up, the budget's training time and, where a run of
    this call measured them, its set-up and measurements."""
    runs = _calibration(size_name)
    setup_s = runs[arch]["setup_and_compile_s"] if runs else schedule.SETUP_S
    measure_s = schedule.MEASURE_S
    if measured:
        setup_s = measured.get("setup_s", 0.0) + measured.get("compile_and_first_step_s", 0.0)
        measure_s = sum(measured.get(k, 0.0) for k in ("eval_s", "extrapolation_s", "decode_s"))
    return schedule.RunTime(
        arch=arch, train_s=plan["expected_train_s"].get(arch, 0.0), setup_s=setup_s, measure_s=measure_s
    )


def _startup_s() -> float:
    """The start-up of a call: calibrate.json's measured one, else the estimate."""
    recorded = (_read_result("calibrate.json") or {}).get("startup") or {}
    return recorded.get("ready_s", schedule.STARTUP_S)


def part_plan() -> None:
    """The budgets train would use (from calibrate.json or the estimate) and the expected time of the calls,
    without data or training."""
    options = lm.Options(_WORK_DIR.value, "", "", "", 0.0, _SEED.value)
    vocab = -(-_vocab_size() // 8) * 8
    startup = _startup_s()
    calibration = _read_result("calibrate.json")
    if calibration:
        _PLAN_FOR["device_kind"] = calibration["device"]["device_kind"]
        log(f"planning for {_PLAN_FOR['device_kind']} (calibrate.json's device)")
    log(f"corpus: {_corpus_tokens(None) or 0:,} training tokens; a call's start-up ~{startup:.0f}s")
    for size_name in _lm_sizes():
        plan = size_budget(size_name, vocab, options)
        size = recipe.LM_SIZES[size_name]
        flops = {a: round(lm.flops_per_token(size, a, vocab, options) / 1e6) for a in recipe.ARCHS}
        epochs = f"{plan['epochs']:.2f} epochs" if plan.get("epochs") is not None else "epochs unknown"
        log(
            f"size {size_name}: {plan['steps']} steps, {plan['tokens']:,} tokens, "
            f"{plan['tokens_per_param']:.1f} per parameter, {epochs} (limited by {plan['limited_by']}); "
            f"MFLOP/token {flops}; {plan['basis']}"
        )
        times = [_run_time(size_name, arch, plan) for arch in _ARCH.value]
        for run in times:
            log(
                f"  {run.arch}: ~{run.train_s:.0f}s training, ~{run.total_s / 60:.1f} min a run "
                f"(set-up {run.setup_s:.0f}s, measurements {run.measure_s:.0f}s), "
                f"~{schedule.call_seconds(startup, [run]) / 60:.1f} min as a call of its own"
            )
        together = schedule.call_seconds(startup, times)
        fit = schedule.runs_that_fit(startup, times, _TIME_LIMIT_S.value)
        log(
            f"  one call with --arch={','.join(_ARCH.value)}: ~{together / 60:.1f} min; "
            f"{fit} of {len(times)} runs fit a call of {_TIME_LIMIT_S.value:.0f}s"
        )


def part_train() -> None:
    tokenizer, options = _prepare()
    done: list[str] = []
    for size_name in _lm_sizes():
        plan = size_budget(size_name, model_vocab_size(tokenizer), options)
        log(f"size {size_name}: {plan['steps']} steps, {plan['tokens']:,} tokens ({plan['basis']})")
        measured: dict[str, float] | None = None
        for arch in _ARCH.value:
            expected = _run_time(size_name, arch, plan, measured)
            now = time.perf_counter() - _STARTED
            if done and not _SMOKE.value and not schedule.fits(now, _TIME_LIMIT_S.value, expected):
                # A run cut short by the deadline compares with nothing: leave it to a call of its own.
                log(
                    f"NOT RUN: {arch} {size_name} needs ~{expected.with_margin():.0f}s, "
                    f"{_TIME_LIMIT_S.value - now:.0f}s are left; run it in a call of its own "
                    f"(--part=train --arch={arch} --size={size_name})."
                )
                done.append(f"{arch} {size_name}: not run")
                continue
            try:
                result = lm.train(recipe.LM_SIZES[size_name], arch, tokenizer, options, plan, log)
            except Exception as error:  # noqa: BLE001 — the failure is the result; the next run goes on
                result = dict(arch=arch, budget=plan, **_failure(error))
            result["startup"] = _STARTUP
            write_json(f"train_{arch}_{size_name}.json", dict(size=size_name, **result))
            measured = result.get("phases") or measured
            done.append(
                f"{arch} {size_name}: {result['status']}"
                + (" (truncated)" if result.get("truncated") else "")
            )
            gc.collect()
    log("train: " + "; ".join(done))


def part_mqar() -> None:
    setup = recipe.MQAR_SETUPS["smoke" if _SMOKE.value else _MQAR_SETUP.value]
    if _MQAR_STEPS.value:
        setup = dataclasses.replace(setup, steps=_MQAR_STEPS.value)
    if _MQAR_LRS.value:
        setup = dataclasses.replace(setup, learning_rates=tuple(float(x) for x in _MQAR_LRS.value))
    variant = recipe.mqar_variant(
        "smoke" if _SMOKE.value else _MQAR_SETUP.value, _MQAR_STEPS.value, _MQAR_LRS.value
    )
    start = time.perf_counter()
    train, tests = recall.datasets(setup, _SEED.value)
    seconds = time.perf_counter() - start
    log(f"MQAR data: {len(train['inputs']):,} training rows, {len(tests)} test sets ({seconds:.1f}s)")
    for size_name in ["smoke"] if _SMOKE.value else _MQAR_SIZE.value:
        size = recipe.MQAR_SIZES[size_name]
        for arch in _ARCH.value:
            runs = []
            for lr in setup.learning_rates:
                try:
                    runs.append(recall.run(size, arch, setup, lr, train, tests, seed=_SEED.value, log=log))
                except Exception as error:  # noqa: BLE001 — recorded with the others
                    runs.append(dict(learning_rate=lr, **_failure(error)))
            done = [r for r in runs if "test" in r]
            best = {"accuracy": {}, "loss": {}, "learning_rate": {}}
            for pairs in (str(p) for p in setup.eval_pairs):
                if done:
                    top = max(done, key=lambda r, p=pairs: r["test"][p]["accuracy"])
                    best["accuracy"][pairs] = top["test"][pairs]["accuracy"]
                    best["loss"][pairs] = top["test"][pairs]["loss"]
                    best["learning_rate"][pairs] = top["learning_rate"]
            write_json(
                f"mqar_{arch}_{size_name}{variant}.json",
                dict(
                    arch=arch,
                    size=dataclasses.asdict(size),
                    setup=dataclasses.asdict(setup),
                    runs=runs,
                    best=best,
                ),
            )


def part_report() -> None:
    date = _DATE.value or datetime.date.today().isoformat()
    path = report.write_report(_results_dir(), _report_dir(), date)
    log(f"wrote {path}")


def main(argv) -> None:
    del argv
    unknown = [p for p in _PART.value if p not in PARTS]
    if unknown:
        raise app.UsageError(f"--part: unknown {unknown}; choose from {PARTS}.")
    for name, values, known in (
        ("size", _lm_sizes(), recipe.LM_SIZES),
        ("mqar_size", _MQAR_SIZE.value, recipe.MQAR_SIZES),
        ("arch", _ARCH.value, recipe.ARCHS),
    ):
        bad = [v for v in values if v not in known]
        if bad:
            raise app.UsageError(f"--{name}: unknown {bad}; choose from {sorted(known)}.")
    if {"calibrate", "plan", "train"} & set(_PART.value):
        for size_name in _lm_sizes():
            for arch in _ARCH.value:
                try:
                    recipe.check_arch_for_size(arch, size_name)
                except ValueError as error:
                    raise app.UsageError(str(error)) from None
    log(f"devices: {jax.devices()}")
    for part in _PART.value:
        log(f"== {part} ({time.perf_counter() - _STARTED:.0f}s since start)")
        globals()[f"part_{part}"]()


if __name__ == "__main__":
    app.run(main)
