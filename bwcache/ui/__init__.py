"""Pure helpers behind the comparison app, importable and testable without Gradio: presets as form values
(`forms`), the app's fields by name (`fields`), the Calibrate tab (`calibration`), checks of what users send (`requests`), GPU budgets (`budget`), run
folders and examples (`runs`), the run service (`service`), and run records shaped for the views (`views`)."""

from .budget import (
    WAN_SHAPES,
    ZEROGPU_CALL_LIMIT_SECONDS,
    check_gpu_budget,
    comparison_runs,
    estimate_seconds,
    gpu_seconds,
    needs_gpu,
    oom_message,
    sweep_runs,
)
from .fields import (
    DEFAULT_SWEEP,
    GENERATION_FIELDS,
    compare_parameters,
    endpoint,
    form_keys,
    profile_keys,
    sweep_parameters,
)
from .forms import available_presets, default_preset_name, preset_form, preset_notes, profile_info
from .requests import (
    MAX_SWEEP_POINTS,
    NEGATIVE_PROMPT_MAX_CHARS,
    NO_PEER,
    PEER_METHODS,
    SEED_MAX,
    UNAVAILABLE_PEERS,
    check_profile,
    check_request,
    check_seed,
    parse_peer,
    parse_thresholds,
    request_config,
    request_fields,
    resolved_settings,
)
from .runs import (
    PARTIAL_PREFIX,
    download_list,
    example_label,
    example_paths,
    example_summary,
    find_example,
    list_examples,
    max_runs,
    new_run_dir,
    prune_cache,
    prune_runs,
    remove_partial_runs,
    save_run,
    save_run_folder,
    save_sweep,
    sweep_csv,
)
from .views import (
    FEATURE_LABELS,
    HEATMAP_VIEWS,
    SWEEP_HEADERS,
    THRESHOLD_RANGE,
    TUNING_MODES,
    branch_choices,
    heatmap,
    sweep_plot,
    sweep_table,
    tuning_source,
    tuning_view,
)
from . import calibration
