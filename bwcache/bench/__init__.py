"""Speed at quality: BWCache against diffusers' own caches over many prompts, plus the cache's overheads.

`python -m bwcache bench` runs, for each prompt: a warm-up, then per repeat the uncached run and every method's
cached run, in one process, so each speedup is a ratio of two runs taken side by side. Reported per method: median
speedup over prompts × repeats, mean PSNR and SSIM against the uncached video (float frames, before encoding), and
the share of the DiT blocks' compute that the method skipped: the FLOPs of their linear layers and of their attention
(from the shapes of each attention call that runs), measured the same way for every method.

By default the prompts are ones no default was tuned on (`HELD_OUT_PROMPTS`), and the results go to a new folder;
an existing result file is overwritten only with `--overwrite`.
"""

from __future__ import annotations

from ..instruments import ComputeProbe
from ..instruments import probe_flops as _probe_flops  # noqa: F401  (the benchmark's own name for it)
from .cli import add_arguments, output_paths, run_from_args
from .methods import HELD_OUT_PROMPTS, PROMPT_SETS, TINY_PROMPTS, Method, default_methods, select_methods
from .report import markdown_table, pareto, pareto_figure, pareto_svg, report_markdown
from .run import (
    MEMORY_KEYS,
    OVERHEAD_PROMPTS,
    OVERHEAD_REPEATS,
    Progress,
    cache_work_shares,
    memory_configs,
    memory_overhead,
    other_storage,
    overheads_for_prompt,
    run_benchmark,
)

__all__ = [
    "ComputeProbe",
    "HELD_OUT_PROMPTS",
    "MEMORY_KEYS",
    "Method",
    "OVERHEAD_PROMPTS",
    "OVERHEAD_REPEATS",
    "PROMPT_SETS",
    "Progress",
    "TINY_PROMPTS",
    "add_arguments",
    "cache_work_shares",
    "default_methods",
    "markdown_table",
    "memory_configs",
    "memory_overhead",
    "other_storage",
    "output_paths",
    "overheads_for_prompt",
    "pareto",
    "pareto_figure",
    "pareto_svg",
    "report_markdown",
    "run_benchmark",
    "run_from_args",
    "select_methods",
]
