"""vLLM on this machine's CPU serves our drafters beside vLLM's own methods, on the same prompts, in
one table: plain greedy, vLLM's `ngram` and `suffix`, vLLM's `medusa` and `eagle3` on our exports,
and our own proposer loaded through `custom_class` (heads + lookup, EAGLE-3 + lookup).

Runs inside the vLLM venv (benchmarks/serve_check.sh makes it and calls this); it imports vllm (and
medusaforge only inside vLLM, through `custom_class`). The pure parts (acceptance, the choice of K,
the order, the tables) are in serve_check_report.py.

  .venv-vllm/bin/python benchmarks/serve_check.py --base DIR --prompts prompts.json \
      [--medusa DIR] [--eagle3 DIR] [--ours-heads DIR] [--ours-eagle3 DIR] [--rounds N]

How it measures (printed with the results):
- every engine runs in its own process, one at a time, never two at once;
- a short sweep first picks num_speculative_tokens (K) per mode: K = 1, 2, ... on the sweep
  prompts (not the measured ones), one prompt at a time, stopping once two K's in a row were
  slower than an earlier one; the pick is the smallest K within 2% of the fastest;
- then each round runs every mode once, in an order rotated each round: a warm-up, every prompt
  set one prompt at a time, then every set as one batch; "vs plain" divides by plain's speed in
  the same round, and with several rounds the table gives median (min-max);
- accepted length is 1 + accepted / drafts, and acceptance per position is accepted at that
  position / drafts, from vLLM's spec-decode counters (`vllm:spec_decode_*`, kept only when
  stats are on); "identical" counts prompts whose greedy output equals plain's token for token.

vLLM CPU settings that matter (printed with their values):
  VLLM_CPU_OMP_THREADS_BIND  which cores the OpenMP threads are pinned to ("auto": vLLM keeps one
                             core for its own processes and computes on the rest)
  VLLM_CPU_KVCACHE_SPACE     GiB reserved for the KV cache (serve_check.sh sets 1: 45k tokens)
  LD_PRELOAD                 vLLM warns that speculative decoding on CPU without Intel OpenMP
                             preloaded is much slower; serve_check.sh preloads the venv's libiomp5
  gpu_memory_utilization     on the CPU backend, the share of RAM vLLM reserves (--memory-fraction)
  dtype                      bfloat16 only where the CPU has native bf16 (avx512_bf16 or amx_bf16)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_check_report.py, beside this file
from serve_check_report import (  # noqa: E402
    LABELS, acceptance, alternation, choose_k, sweep_should_stop, sweep_table, table,
)

MODES = ("plain", "ngram", "suffix", "medusa", "eagle3", "ours-heads", "ours-eagle3")
SWEPT = ("ngram", "medusa", "eagle3", "ours-heads", "ours-eagle3")  # suffix sizes its own drafts
OURS_CLASS = "medusaforge.serving.vllm.proposer.MedusaforgeProposer"


def cpu_info() -> dict:
    """What decides CPU speed here: the model, the SIMD/bf16 flags, cores, and how busy it is."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = sorted(set(text.split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return {"cpu": model, "flags": flags, "cores": os.cpu_count(),
            "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()]}


def default_dtype(flags: list[str]) -> str:
    """bfloat16 with native bf16 matmuls; elsewhere bf16 is emulated and slower than float32."""
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def num_heads(folder) -> int:
    config = json.loads((Path(folder) / "config.json").read_text())
    return config.get("num_heads") or config.get("medusa_num_heads") or 1


def speculative_config(mode: str, k: int | None, args) -> dict | None:
    if mode == "plain":
        return None
    if mode == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    if mode == "suffix":
        # The global tree caches past responses; this benchmark repeats the same prompts (warm-up,
        # one at a time, batched, rounds), which it would then replay. Only per-prompt trees here.
        return {"method": "suffix", "suffix_decoding_max_cached_requests": 0}
    if mode == "medusa":
        return {"method": "medusa", "model": str(args.medusa), "num_speculative_tokens": k}
    if mode == "eagle3":
        return {"method": "eagle3", "model": str(args.eagle3), "num_speculative_tokens": k}
    return {"method": "custom_class", "model": OURS_CLASS, "num_speculative_tokens": k}


def mode_env(mode: str, args) -> dict:
    """Our proposer reads its drafter folder from the environment (it gets only the VllmConfig)."""
    if mode == "ours-heads":
        return {"MEDUSAFORGE_DRAFTER": str(args.ours_heads), "MEDUSAFORGE_LOOKUP": "1"}
    if mode == "ours-eagle3":
        return {"MEDUSAFORGE_DRAFTER": str(args.ours_eagle3), "MEDUSAFORGE_LOOKUP": "1"}
    return {}


def spec_counters(llm) -> dict:
    """Sum vLLM's spec-decode counters (names with or without the Prometheus `_total` suffix)."""
    totals: dict = {}
    for metric in llm.get_metrics():
        name = metric.name.removesuffix("_total")
        if not name.startswith("vllm:spec_decode_"):
            continue
        key = name.removeprefix("vllm:spec_decode_")
        if hasattr(metric, "values"):  # a vector: one count per draft position
            previous = totals.get(key, [0] * len(metric.values))
            totals[key] = [a + b for a, b in zip(previous, metric.values)]
        elif hasattr(metric, "value"):
            totals[key] = totals.get(key, 0) + metric.value
    return totals


def start_engine(mode: str, k: int | None, args):
    if mode.startswith("ours-"):
        import importlib  # fail here, with the reason, rather than deep inside the engine's start-up
        try:
            importlib.import_module(OURS_CLASS.rsplit(".", 1)[0])
        except Exception as error:
            raise RuntimeError(f"skipped: cannot import {OURS_CLASS.rsplit('.', 1)[0]} in this venv "
                               f"({type(error).__name__}: {error})") from None
    from vllm import LLM
    return LLM(model=args.base, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
               speculative_config=speculative_config(mode, k, args),
               disable_log_stats=False,  # the spec-decode counters are only kept with stats on
               gpu_memory_utilization=args.memory_fraction, enforce_eager=args.enforce_eager)


def stop_engine(llm) -> None:
    # Ends the engine-core and worker processes now; past 2 s they are killed (vLLM's default waits
    # 5 s, for each of the sweep's engines). run_worker kills whatever is left when the worker ends.
    llm.llm_engine.engine_core.shutdown(timeout=2)
    del llm
    gc.collect()


def timed_pass(llm, batches: list[list[str]], max_tokens: int, drafting: bool) -> dict:
    from vllm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    before = spec_counters(llm) if drafting else {}
    start = time.perf_counter()
    outputs = [out for batch in batches for out in llm.generate(batch, params, use_tqdm=False)]
    seconds = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    generated = sum(map(len, tokens))
    return {"seconds": seconds, "generated_tokens": generated, "tokens_per_second": generated / seconds,
            "token_ids": tokens, **(acceptance(before, spec_counters(llm)) if drafting else {})}


def chat_texts(llm, prompts: list) -> list[str]:
    tokenizer = llm.get_tokenizer()
    chats = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]


def warm_up(llm, texts: list[str]) -> None:
    from vllm import SamplingParams
    llm.generate(texts[:1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)


def measure(mode: str, k: int | None, args, prompt_sets: dict[str, list]) -> dict:
    """One engine, one mode: warm up, every set one prompt at a time, then every set as one batch."""
    start = time.perf_counter()
    llm = start_engine(mode, k, args)
    report = {"mode": mode, "k": llm.llm_engine.vllm_config.speculative_config.num_speculative_tokens
              if mode != "plain" else None, "loaded": True, "load_seconds": time.perf_counter() - start, "runs": {}}
    texts = {name: chat_texts(llm, prompts) for name, prompts in prompt_sets.items()}
    warm_up(llm, next(iter(texts.values())))
    for name, batch in texts.items():
        report["runs"][name] = {"one_at_a_time": timed_pass(llm, [[t] for t in batch], args.max_tokens, mode != "plain")}
    for name, batch in texts.items():
        report["runs"][name]["batched"] = timed_pass(llm, [batch], args.max_tokens, mode != "plain")
    return report


def sweep(mode: str, ks: list[int], args, prompts: list, report_path: Path) -> dict:
    """K = ks[0], ks[1], ... in turn, one engine each (in this one process), on the sweep prompts
    one at a time; stops early (sweep_should_stop). Written after every K, so a crash keeps the rest."""
    result = {"mode": mode, "loaded": True, "points": []}
    for k in ks:
        llm = start_engine(mode, k, args)
        texts = chat_texts(llm, prompts)
        warm_up(llm, texts)
        run = timed_pass(llm, [[t] for t in texts], args.sweep_max_tokens, drafting=True)
        stop_engine(llm)
        result["points"].append({"k": k, **{key: run[key] for key in
                                 ("tokens_per_second", "accept_length", "acceptance_per_position", "generated_tokens")}})
        report_path.write_text(json.dumps(result))
        if sweep_should_stop(result["points"]):
            break
    return result


def run_worker(mode: str, args, workdir: Path, log_name: str, extra: list[str]) -> dict:
    """This script again, in its own process (its own engine), for one mode; its log is kept."""
    out = workdir / f"{log_name}.json"
    log = args.log_dir / f"{log_name}.log"
    command = [sys.executable, __file__, *args.passthrough, "--only", mode, "--report", str(out), *extra]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **mode_env(mode, args)})
        try:
            returncode = process.wait(timeout=args.mode_timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # done, timed out, or this process is stopping: end the worker's session, engines included
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    report = json.loads(out.read_text()) if out.is_file() else None
    if returncode == 0 and report is not None:
        return report
    lines = log.read_text(errors="replace").splitlines()
    # The engine core fails in a child process; its own error comes before the parent's summary.
    errors = [line.strip() for line in lines if ("Error" in line or "skipped:" in line)
              and "Engine core initialization failed" not in line]
    error = (f"timed out after {args.mode_timeout} s" if returncode is None
             else errors[-1] if errors else lines[-1] if lines else "no output")
    if report is not None and report.get("points"):  # a sweep that measured some K's before failing
        return dict(report, error=error)
    return {"mode": mode, "loaded": False, "error": error, "log": str(log)}


def planned_modes(args) -> tuple[list[str], dict[str, str]]:
    """The modes to run, and for the others why not (a missing input folder)."""
    needs = {"medusa": args.medusa, "eagle3": args.eagle3, "ours-heads": args.ours_heads, "ours-eagle3": args.ours_eagle3}
    wanted = [m for m in MODES if m in args.modes]
    skipped = {m: f"no {'--' + m.replace('_', '-')} folder given" for m in wanted if m in needs and not needs[m]}
    return [m for m in wanted if m not in skipped], skipped


def run_sweeps(modes: list[str], args, prompts: list, workdir: Path) -> dict[str, dict]:
    sweeps = {}
    for mode in [m for m in modes if m in SWEPT]:
        ks = [k for k in args.sweep_ks if mode != "medusa" or k <= num_heads(args.medusa)]
        start = time.perf_counter()
        result = run_worker(mode, args, workdir, f"sweep-{mode}", ["--sweep", ",".join(map(str, ks))])
        result["chosen"] = choose_k(result.get("points", []))
        sweeps[mode] = result
        figures = ", ".join(f"K={p['k']}: {p['tokens_per_second']:.1f} tok/s" for p in result.get("points", []))
        print(f"sweep {mode}: {figures or result.get('error')} -> K={result['chosen']} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return sweeps


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM (timeout, make interrupted) unwinds like Ctrl-C, so run_worker ends its engine's processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    prompt_sets = read_prompts(args.prompts, args.num_prompts)
    if args.only:
        if args.sweep:
            sweep(args.only, [int(k) for k in args.sweep.split(",")], args, prompt_sets.pop("sweep"), args.report)
        else:
            prompt_sets.pop("sweep", None)
            args.report.write_text(json.dumps(measure(args.only, args.k or None, args, prompt_sets)))
        sys.stdout.flush()
        os._exit(0)  # the report is written: skip the engine's graceful exit, run_worker ends its processes
    wall_start = time.perf_counter()
    sweep_prompts = prompt_sets.pop("sweep", None)
    modes, skipped = planned_modes(args)
    settings = {**cpu_info(),
                "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (default)"),
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4 GiB (default)"),
                "LD_PRELOAD": os.environ.get("LD_PRELOAD", "(none)"), "gpu_memory_utilization": args.memory_fraction,
                "dtype": args.dtype, "enforce_eager": args.enforce_eager, "max_tokens": args.max_tokens,
                "prompts": {name: len(p) for name, p in prompt_sets.items()}, "rounds": args.rounds}
    print("serve-check settings:", json.dumps(settings), flush=True)
    print(f"How it runs: every mode in its own process (its own vLLM engine), one after another, never two "
          f"at once; {args.rounds} round(s), the order rotated each round (rounds split by |): "
          + " | ".join(", ".join(m for r, m in alternation(modes, args.rounds) if r == i) for i in range(args.rounds)),
          flush=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sweeps = run_sweeps(modes, args, sweep_prompts, workdir) if sweep_prompts and args.sweep_ks else {}
        chosen = {m: s["chosen"] for m, s in sweeps.items()}
        failed = {m: s.get("error", "sweep failed") for m, s in sweeps.items() if not s["chosen"]}
        by_round: list[dict[str, dict]] = [{} for _ in range(args.rounds)]
        for round_index, mode in alternation([m for m in modes if m not in failed], args.rounds):
            start = time.perf_counter()
            extra = ["--k", str(chosen.get(mode) or args.default_k)] if mode in SWEPT else []
            report = run_worker(mode, args, workdir, f"{mode}-round{round_index + 1}", extra)
            by_round[round_index][mode] = report
            print(f"round {round_index + 1} {mode}: {'done' if report.get('loaded') else 'FAILED: ' + report['error']}"
                  f" in {time.perf_counter() - start:.0f} s", flush=True)
    for mode, reason in {**skipped, **failed}.items():
        by_round[0][mode] = {"mode": mode, "loaded": False, "error": reason}
    print_results(args, settings, modes + list(skipped), prompt_sets, by_round, sweeps, len(sweep_prompts or []),
                  time.perf_counter() - wall_start)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": settings, "sweeps": sweeps, "rounds": by_round}, indent=1) + "\n")
    return 0 if all(r.get("loaded") for rounds in by_round for r in rounds.values()) else 1


def print_results(args, settings, modes, prompt_sets, by_round, sweeps, num_sweep_prompts, seconds) -> None:
    order = [m for m in MODES if m in modes]
    print(f"\n### vLLM {vllm_version()} on this CPU: greedy, max {args.max_tokens} new tokens, {args.dtype}\n")
    print(f"CPU: {settings['cpu']} ({settings['cores']} cores; {', '.join(settings['flags'])}); load average at "
          f"start {settings['load_average_1_5_15_min']} (1, 5, 15 min). Prompts: "
          + ", ".join(f"{len(p)} {name}" for name, p in prompt_sets.items())
          + ". Every mode ran in its own process (its own engine), one after another, never two at once; "
          + (f"{args.rounds} rounds in alternation, the order rotated each round; 'vs plain' is taken within a "
             "round, then given as median (min-max) over rounds." if args.rounds > 1 else
             "one round: each mode ran once, so a change of load between modes is not averaged out "
             "(--rounds 2, ROUNDS=2 in serve_check.sh, repeats them in alternation)."))
    if sweeps:
        print(f"\nK per mode, from a sweep on {num_sweep_prompts} other prompts, one at a time, max "
              f"{args.sweep_max_tokens} new tokens (tok/s, accepted length; the smallest K within 2% of the fastest):\n")
        print(sweep_table(sweeps))
    print()
    print(table(by_round, order, list(prompt_sets)))
    for mode in order:
        report = by_round[0].get(mode, {})
        if not report.get("loaded"):
            print(f"- {LABELS.get(mode, mode)}: not run: {report.get('error', '?')}")
    print(f"\nLoad average at the end: {[round(x, 2) for x in os.getloadavg()]} (1, 5, 15 min). "
          f"serve_check.py wall time: {seconds / 60:.1f} min ({seconds:.0f} s)")


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    for name in ("vllm-cpu", "vllm"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "?"


def read_prompts(path: Path, limit: int) -> dict[str, list]:
    """{set name: prompts}; a plain list is the MT-Bench set (the older prompts.json)."""
    data = json.loads(Path(path).read_text())
    sets = data if isinstance(data, dict) else {"mt-bench": data}
    return {name: prompts if name == "sweep" else prompts[:limit] for name, prompts in sets.items()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="Hugging Face folder of the base model the drafters were trained on")
    parser.add_argument("--medusa", help="our heads, `medusaforge export --format vllm` (vLLM's `medusa` row)")
    parser.add_argument("--eagle3", help="our EAGLE-3 draft in the engine layout (vLLM's `eagle3` row)")
    parser.add_argument("--ours-heads", help="trained heads folder for our proposer (MEDUSAFORGE_DRAFTER)")
    parser.add_argument("--ours-eagle3", help="trained EAGLE-3 folder for our proposer (MEDUSAFORGE_DRAFTER)")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES), help="comma-separated subset")
    parser.add_argument("--prompts", type=Path, required=True,
                        help='JSON {"mt-bench": [...], "copy-heavy": [...], "sweep": [...]} (chats or strings)')
    parser.add_argument("--num-prompts", type=int, default=16, help="per measured set")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="every mode once per round, in alternation")
    parser.add_argument("--sweep-ks", type=lambda s: [int(k) for k in s.split(",") if k], default=[1, 2, 3, 4, 5],
                        help="K's to try per mode, in order (empty: no sweep, --default-k)")
    parser.add_argument("--sweep-max-tokens", type=int, default=64)
    parser.add_argument("--default-k", type=int, default=3, help="K when the sweep is off")
    parser.add_argument("--dtype", default=default_dtype(cpu_info()["flags"]), help="default: bfloat16 with native bf16, else float32")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--memory-fraction", type=float, default=0.3,
                        help="vLLM's gpu_memory_utilization: on a CPU, the share of RAM it reserves")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="skip torch.compile (minutes of start-up on a small CPU)")
    parser.add_argument("--mode-timeout", type=int, default=1200, help="seconds before one engine's process is killed")
    parser.add_argument("--out", type=Path, help="write every report (with token ids) as JSON here; logs beside it")
    parser.add_argument("--only", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a subprocess
    parser.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sweep", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(MODES)})")
    args.passthrough = list(argv if argv is not None else sys.argv[1:])
    if "--out" in args.passthrough:
        i = args.passthrough.index("--out")
        del args.passthrough[i: i + 2]
    args.log_dir = args.out.parent if args.out else Path(tempfile.gettempdir()) / "serve-check-logs"
    return args


if __name__ == "__main__":
    sys.exit(main())
