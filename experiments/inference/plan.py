"""What ``bench_inference`` runs: its flags, the named XLA flag sets, and the plan that turns them into
groups of tasks (one group per arch, then one per XLA flag set and arch), each measured by one worker."""

from __future__ import annotations

from typing import Any

from absl import flags

from experiments import benchlib as bl

PANELS = ("length", "batch", "prefill", "fit", "state")
# Named XLA flag sets for --xla_flag_sets (flags appended to XLA_FLAGS in the set's worker).
FLAG_SETS = {
    # The decoding loop (a while loop) captured whole into CUDA graphs: XLA's default command buffer
    # types plus WHILE and CONDITIONAL.
    "cmdbuf": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
    # One-row (matrix-vector) products kept as matrix products (cuBLAS/Triton) instead of being rewritten
    # into multiply + reduce fusions (XLA's GPU pass "dot-strength-reduction").
    "nostrength": "--xla_disable_hlo_passes=dot-strength-reduction",
}
# Each group's share of the time budget (a worker gets its share of what is left when it starts).
_SHARES = {"retnet": 6.0, "retnet-loop": 3.0, "transformer": 3.5, "flags": 1.5}  # of the time budget

ARCHS = flags.DEFINE_list(
    "archs",
    ["retnet", "transformer"],
    "retnet, retnet-loop (the decode step's layer loop not unrolled: unroll_decode=False), transformer.",
)
DECODE_IMPLS = flags.DEFINE_list(
    "decode_impls",
    [],
    "Also time each arch's decoding rows (the length, batch and state parts) with these implementations "
    "side by side: IMPL, IMPL/PROJ or IMPL/PROJ/LAYOUT, IMPL and PROJ each xla, pallas or auto: a "
    "RetNet's retention step (pallas: the fused decode kernel) and the projections (pallas: the few-row "
    "kernel); LAYOUT one or more of these joined by '+': 'stacked': the loop reads the layer-stacked "
    "weights instead of per-layer copies, 'separate': per-layer copies with the mixer's input projections "
    "apart (the default joins q, k, v, g into one product a layer: LMDecoder.fuse_projections), 'dn': the "
    "copies' kernels kept [D, N], 'nd': stored transposed [N, D] (LMDecoder.transpose_kernels; the default "
    "transposes them where PROJ may run the few-row kernel). Rows "
    "labelled ARCH@ENTRY (the arch's own rows run 'auto'; a Transformer takes only entries with /PROJ). "
    "E.g. --decode_impls=xla,pallas/xla,pallas/pallas,pallas/pallas/dn,auto/auto/stacked.",
)
MODEL = flags.DEFINE_string("model", "paper-1.3b", "Model preset (RetNetConfig.preset); tiny on a CPU.")
RUN_PANELS = flags.DEFINE_list("panels", list(PANELS), f"Parts, run in this order: {', '.join(PANELS)}.")
CONTEXTS = flags.DEFINE_string("contexts", "1024,8192,65536,262144,1048576", "Contexts of the length part.")
LENGTH_BATCH = flags.DEFINE_integer("length_batch", 1, "Batch of the length part.")
BATCHES = flags.DEFINE_string("batches", "1,8,64,256", "Batches of the batch part (run in this order).")
BATCH_CONTEXT = flags.DEFINE_integer("batch_context", 8192, "Context of the batch, fit and flag parts.")
STEPS = flags.DEFINE_integer("decode_steps", 64, "Decode steps per timed call.")
PREFILL_LENGTHS = flags.DEFINE_string("prefill_lengths", "8192", "Prompt lengths T of prefill.")
PREFILL_BATCH = flags.DEFINE_integer("prefill_batch", 1, "Batch of prefill and of the training forward.")
STATE_BATCHES = flags.DEFINE_string("state_batches", "64,256", "Batches decoded with a bfloat16 state.")
CHECK_STEPS = flags.DEFINE_integer("state_check_steps", 256, "Steps of the bf16 state's error check.")
CHECK_PROMPT = flags.DEFINE_integer("state_check_prompt", 1024, "Prompt tokens of the error check.")
CHECK_BATCH = flags.DEFINE_integer("state_check_batch", 4, "Rows of the error check.")
XLA_FLAG_SETS = flags.DEFINE_string(
    "xla_flag_sets", "", f"';'-separated XLA flag sets: names of {sorted(FLAG_SETS)}, a+b, or name=FLAGS."
)
FLAG_ARCHS = flags.DEFINE_list("flag_set_archs", ["retnet"], "Archs rerun under each XLA flag set.")
FLAG_BATCHES = flags.DEFINE_string("flag_set_batches", "1,64", "Batches rerun under each flag set.")
DTYPE = flags.DEFINE_string("dtype", "auto", "Compute and parameter dtype (auto: bfloat16 on GPU, else f32).")
IN_PROCESS = flags.DEFINE_bool(
    "in_process", False, "Run the default-flag parts in this process (CPU smoke runs; flag sets still spawn)."
)
HLO = flags.DEFINE_bool("hlo", True, "Write the compiled decoding programs' HLO to a zip beside the report.")

flags.FLAGS.set_default("repeats", 5)
flags.FLAGS.set_default("time_budget_s", 480.0)


LAYOUTS = ("stacked", "separate", "dn", "nd")  # the loop's weights (--decode_impls' LAYOUT)


def is_retnet(arch: str) -> bool:
    return arch.startswith("retnet")


def base_arch(arch: str) -> str:
    """The arch of a row label ARCH@IMPL (``--decode_impls``)."""
    return arch.split("@", 1)[0]


def parse_flag_sets(text: str) -> dict[str, str]:
    """{name: XLA flags} from --xla_flag_sets (see the module doc)."""
    sets: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        if "=" in entry.split("--", 1)[0]:  # name=--flag=...
            name, value = entry.split("=", 1)
            sets[name.strip()] = value.strip()
            continue
        for name in (n.strip() for n in entry.split(",") if n.strip()):
            parts = name.split("+")
            unknown = [p for p in parts if p not in FLAG_SETS]
            if unknown:
                raise ValueError(
                    f"--xla_flag_sets: unknown set(s) {unknown}; known: {sorted(FLAG_SETS)}, or give "
                    f"name=--xla_flag=value."
                )
            sets[name] = " ".join(FLAG_SETS[p] for p in parts)
    return sets


def decode_task(arch, context, batch, panel, state_dtype=None, flags_name="default"):
    return dict(
        kind="decode",
        arch=arch,
        T=context,
        B=batch,
        state_dtype=state_dtype,
        panels=[panel],
        flags=flags_name,
    )


def groups_tasks(groups, arch: str) -> list[dict[str, Any]]:
    """The tasks of ``arch``'s default group (copies)."""
    return [dict(t) for g in groups if g["name"] == arch for t in g["tasks"]]


def plan_groups() -> list[dict[str, Any]]:
    """One group per arch (its parts in --panels order), then one per (XLA flag set, arch)."""
    unknown = sorted(set(RUN_PANELS.value) - set(PANELS))
    if unknown:
        raise ValueError(f"--panels: unknown {unknown}; choose from {PANELS}.")
    groups = []
    for arch in ARCHS.value:
        tasks: list[dict[str, Any]] = []

        def add(task, tasks=tasks):
            for other in tasks:  # one run serves both panels
                if other["kind"] == "decode" and all(
                    other[k] == task[k] for k in ("T", "B", "state_dtype", "flags")
                ):
                    other["panels"] += task["panels"]
                    return
            tasks.append(task)

        for panel in RUN_PANELS.value:
            if panel == "length":
                for context in bl.int_list(CONTEXTS.value):
                    add(decode_task(arch, context, LENGTH_BATCH.value, "length"))
            elif panel == "batch":
                for batch in bl.int_list(BATCHES.value):
                    add(decode_task(arch, BATCH_CONTEXT.value, batch, "batch"))
            elif panel == "prefill":
                for length in bl.int_list(PREFILL_LENGTHS.value):
                    for variant in ("forward", "state", "decoder"):
                        tasks.append(
                            dict(kind="prefill", variant=variant, arch=arch, T=length, B=PREFILL_BATCH.value)
                        )
            elif panel == "state" and is_retnet(arch):
                for batch in bl.int_list(STATE_BATCHES.value):
                    add(decode_task(arch, BATCH_CONTEXT.value, batch, "state", "bfloat16"))
                tasks.append(dict(kind="state_check", arch=arch, B=CHECK_BATCH.value, T=CHECK_PROMPT.value))
            elif panel == "fit":
                tasks.append(dict(kind="fit", arch=arch, T=BATCH_CONTEXT.value, state_dtype=None))
        groups.append(
            dict(name=arch, arch=arch, flags="default", xla_flags="", tasks=tasks, share=_SHARES[arch])
        )
    for arch in ARCHS.value:  # the decoding rows again, per implementation
        for impl in DECODE_IMPLS.value:
            parts = impl.split("/")
            kernels, layout = parts[:2], parts[2:]
            options = layout[0].split("+") if layout else []
            if (
                len(parts) > 3
                or any(p not in ("xla", "pallas", "auto") for p in kernels)
                or any(o not in LAYOUTS for o in options)
                or len(set(options)) < len(options)
                or {"dn", "nd"} <= set(options)
            ):
                raise ValueError(
                    f"--decode_impls: unknown {impl!r}; IMPL, IMPL/PROJ or IMPL/PROJ/LAYOUT, IMPL and "
                    f"PROJ each xla, pallas or auto, LAYOUT one or more of {', '.join(LAYOUTS)} joined by "
                    "'+' (dn or nd, not both)."
                )
            if not is_retnet(arch) and len(parts) == 1:
                continue  # a Transformer has no retention step to vary
            name = f"{arch}@{impl}"
            tasks = [dict(t, arch=name) for t in groups_tasks(groups, arch) if t["kind"] == "decode"]
            if tasks:
                group = dict(name=name, arch=name, flags="default", xla_flags="", tasks=tasks)
                groups.append(dict(group, share=_SHARES[arch] / 2))
    for name, xla_flags in parse_flag_sets(XLA_FLAG_SETS.value).items():
        for arch in FLAG_ARCHS.value:
            tasks = [
                decode_task(arch, BATCH_CONTEXT.value, b, "flags", flags_name=name)
                for b in bl.int_list(FLAG_BATCHES.value)
            ]
            groups.append(
                dict(
                    name=f"{arch} [{name}]",
                    arch=arch,
                    flags=name,
                    xla_flags=xla_flags,
                    tasks=tasks,
                    share=_SHARES["flags"],
                )
            )
    return groups
