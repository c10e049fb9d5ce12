"""Per-model presets: ``presets/<name>.json``, one file per model.

Schema (every key required; ``hub_id``, ``pipeline_class`` and
``recommended_gpu_memory_gb`` may be null, e.g. for the tiny test model)::

    name, label, kind, hub_id, pipeline_class, dtype,
    defaults: prompt, negative_prompt, height, width, num_frames,
              num_inference_steps, guidance_scale, fps, seed
    limits:   height / width: [min, max, multiple]
              num_frames: [min, max, rule]   rule = an int multiple or "Nk+r" (e.g. "4k+1")
              num_inference_steps, guidance_scale: [min, max]
              prompt_max_chars: int
    bwcache:  the model's default cache settings: any of `BWCacheConfig`'s described settings that a preset
              may set (`CACHE_SETTINGS.preset_names`: threshold, reuse_interval, mode, warmup_steps, ...);
              those left out take the config's defaults
    profiles (optional): named alternatives to the default cache settings; the shipped presets name "fast":
              {"fast": {"note": "...", "bwcache": {keys of bwcache to change}}}
              (the default profile, "default", is the bwcache section itself)
    recommended_gpu_memory_gb, notes
    loading (optional): how the checkpoint is loaded, beyond `dtype` (`bwcache.pipelines.loading_plan`):
              component_dtypes: {component: dtype}, overriding `dtype` for named components (e.g. {"vae": "float32"})
              flow_shift: the scheduler's shift, one number or one per size class ({"480p": 3.0, "720p": 5.0}; a
                          request takes the class nearest its pixel count, `SIZE_CLASSES`)
              vae_tiling: true to decode in tiles (`pipe.vae.enable_tiling()`)
              cpu_offload: "model" to load with `pipe.enable_model_cpu_offload()` (one model on the GPU at a time)
              call_defaults: extra pipeline call arguments (`CALL_DEFAULTS`: guidance_scale_2, the low-noise
                          expert's guidance of two-expert pipelines), which a request may change
              image_pipeline_class: where `image` is "optional", the diffusers pipeline class that takes the
                          image when a request gives one, built on the loaded pipeline's components (`from_pipe`;
                          Wan2.2 TI2V-5B: WanImageToVideoPipeline beside its WanPipeline)
    image (optional): "required" for image-to-video, "optional" where a first frame may be given, null otherwise
    model (optional; every diffusers preset has one): the model's shape, for the memory plan (`bwcache.plan`):
              transformer_class and transformer (the diffusers class and its config, built on the meta device),
              experts (1, or 2 for Wan2.2-A14B), vae_compression [temporal, spatial], text_tokens,
              cfg ("separate": cond and uncond calls; "batched": one call with both; "none"), and components
              ({name: parameter count} of the other models: text encoder, VAE, ...; from the model cards)

Loading checks the schema and that the preset's own defaults pass its limits.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import resources
from .config import CACHE_SETTINGS
from .settings import Settings, is_int as _is_int, short_repr

__all__ = [
    "CALL_DEFAULTS",
    "DTYPE_NAMES",
    "PRESETS_DIR",
    "SIZE_CLASSES",
    "Preset",
    "load_preset",
    "list_presets",
    "preset_names",
    "frames_rule_ok",
    "is_profile_file",
]

PRESETS_DIR = resources.PRESETS_DIR

# Shown first in menus: it runs anywhere without downloads.
FIRST_PRESET = "tiny-shapes"

_TOP_KEYS = (
    "name", "label", "kind", "hub_id", "pipeline_class", "dtype",
    "defaults", "limits", "bwcache", "recommended_gpu_memory_gb", "notes",
)
_OPTIONAL_TOP = ("profiles", "loading", "model", "image")
# Whether a preset takes a first frame: required (image-to-video), optional (text-and-image-to-video) or not (null).
IMAGE_INPUTS = ("required", "optional")
_NULLABLE_TOP = {"hub_id", "pipeline_class", "recommended_gpu_memory_gb"}
_DEFAULT_KEYS = (
    "prompt", "negative_prompt", "height", "width", "num_frames",
    "num_inference_steps", "guidance_scale", "fps", "seed",
)
_LIMIT_KEYS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "prompt_max_chars")
DEFAULT_PROFILE = "default"

# The dtypes a preset may name (`dtype`, `loading.component_dtypes`).
DTYPE_NAMES = ("float32", "float16", "bfloat16")
# Size classes a per-size `loading.flow_shift` may name, as (height, width) of the size the models' docs mean.
SIZE_CLASSES = {"480p": (480, 832), "720p": (720, 1280)}
# Pipeline call arguments beyond the request's settings that `loading.call_defaults` may set.
CALL_DEFAULTS = ("guidance_scale_2",)
_LOADING_KEYS = ("component_dtypes", "flow_shift", "vae_tiling", "cpu_offload", "call_defaults",
                 "image_pipeline_class")
CPU_OFFLOAD_MODES = ("model",)

_RULE_RE = re.compile(r"^\s*(\d+)\s*k\s*(?:\+\s*(\d+))?\s*$")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_rule(rule: Any) -> tuple[int, int]:
    """(modulus, remainder) for an int multiple or an "Nk+r" string."""
    if _is_int(rule) and rule >= 1:
        return rule, 0
    if isinstance(rule, str):
        m = _RULE_RE.match(rule)
        if m and int(m.group(1)) >= 1:
            mod = int(m.group(1))
            return mod, int(m.group(2) or 0) % mod
    raise ValueError(f"frame rule must be an integer >= 1 or a string like '4k+1', got {rule!r}")


def _rule_text(rule: Any) -> str:
    mod, rem = _parse_rule(rule)
    if mod == 1:
        return "any count"
    return f"a multiple of {mod}" if rem == 0 else f"a count of the form {mod}k+{rem}"


def frames_rule_ok(num_frames: int, rule: Any) -> bool:
    """Whether ``num_frames`` satisfies ``rule`` (an int multiple or "Nk+r")."""
    mod, rem = _parse_rule(rule)
    return num_frames % mod == rem


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class Preset:
    """One model preset, read-only (nested sections are read-only mappings, lists become tuples)."""

    name: str
    label: str
    kind: str
    hub_id: str | None
    pipeline_class: str | None
    dtype: str
    defaults: Mapping[str, Any] = field(hash=False)
    limits: Mapping[str, Any] = field(hash=False)
    bwcache: Mapping[str, Any] = field(hash=False)
    profiles: Mapping[str, Any] = field(hash=False)
    recommended_gpu_memory_gb: float | None
    notes: str
    loading: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}), hash=False)
    model: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}), hash=False)
    image: str | None = None
    path: Path | None = field(default=None, compare=False)
    # The cache settings its `bwcache` section and profiles were checked against, and build configs with.
    settings: Settings = field(default=CACHE_SETTINGS, compare=False, hash=False, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>", path: Path | None = None,
                  settings: Settings = CACHE_SETTINGS) -> "Preset":
        """Build and check a preset; ValueError names ``source`` and the offending key."""
        _check_schema(data, source, settings)
        preset = cls(
            name=data["name"],
            label=data["label"],
            kind=data["kind"],
            hub_id=data["hub_id"],
            pipeline_class=data["pipeline_class"],
            dtype=data["dtype"],
            defaults=_freeze(data["defaults"]),
            limits=_freeze(data["limits"]),
            bwcache=_freeze(data["bwcache"]),
            profiles=_freeze(data.get("profiles", {})),
            recommended_gpu_memory_gb=data["recommended_gpu_memory_gb"],
            notes=data["notes"],
            loading=_freeze(data.get("loading", {})),
            model=_freeze(data.get("model", {})),
            image=data.get("image"),
            path=path,
            settings=settings,
        )
        try:
            preset.validate_request(**{k: data["defaults"][k] for k in _REQUEST_FIELDS})
        except ValueError as exc:
            raise ValueError(f"{source}: its defaults break its own limits: {exc}") from None
        return preset

    def to_dict(self) -> dict:
        """The preset as plain JSON-able data (the schema, without ``path``)."""
        return {k: _thaw(getattr(self, k)) for k in _TOP_KEYS + _OPTIONAL_TOP}

    @property
    def profile_names(self) -> tuple[str, ...]:
        """The cache profiles this preset names, its default first."""
        return (DEFAULT_PROFILE, *self.profiles)

    def profile_note(self, profile: str | None) -> str:
        """One line about a profile: a built-in one's note, or a profile file's target and measured figures."""
        if is_profile_file(profile):
            return _profile_files().read_profile(profile).note()
        profile = profile or DEFAULT_PROFILE
        self.profile_settings(profile)
        return "the preset's default cache settings" if profile == DEFAULT_PROFILE else self.profiles[profile]["note"]

    def profile_settings(self, profile: str | None = None, num_steps: int | None = None) -> dict:
        """The BWCache settings of a profile: the bwcache section, with the profile's changes. `profile` may also be
        a path to a profile file (`python -m bwcache calibrate`): its settings, those counted in steps scaled to
        `num_steps` when it differs from the step count the file was calibrated at."""
        if is_profile_file(profile):
            return _profile_files().read_profile(profile).settings_for(num_steps)
        profile = profile or DEFAULT_PROFILE
        if profile not in self.profile_names:
            raise ValueError(f"Profile {short_repr(profile)} is not one of {self.label}'s profiles: {', '.join(self.profile_names)}.")
        values = {key: _thaw(value) for key, value in self.bwcache.items()}
        if profile != DEFAULT_PROFILE:
            values.update({key: _thaw(value) for key, value in self.profiles[profile]["bwcache"].items()})
        return values

    def flow_shift(self, height: int, width: int) -> float | None:
        """The scheduler shift `loading.flow_shift` gives a video of this size (None: the scheduler's own): its one
        value, or that of the size class (`SIZE_CLASSES`) nearest the size's pixel count, by ratio."""
        shift = self.loading.get("flow_shift")
        if shift is None or _is_number(shift):
            return shift
        return shift[size_class(height, width, tuple(shift))]

    def call_defaults(self) -> dict:
        """Extra pipeline call arguments the preset sets (`loading.call_defaults`)."""
        return dict(self.loading.get("call_defaults", {}))

    def validate_request(
        self,
        *,
        prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
    ) -> dict:
        """Check generation settings against this preset's limits.

        Fields left as None are not checked. Raises ValueError naming the field,
        the value and what is allowed; returns the checked fields as a dict.
        """
        lim = self.limits
        checked: dict[str, Any] = {}
        if prompt is not None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
            if not prompt.strip():
                raise ValueError("prompt is empty; write a prompt of 1 to "
                                 f"{lim['prompt_max_chars']} characters")
            if len(prompt) > lim["prompt_max_chars"]:
                raise ValueError(
                    f"prompt is {len(prompt)} characters long; {self.label} allows at most {lim['prompt_max_chars']}"
                )
            checked["prompt"] = prompt
        for fname, value in (("height", height), ("width", width)):
            if value is None:
                continue
            lo, hi, mult = lim[fname]
            value = _need_int(_LABELS[fname], value)
            if not lo <= value <= hi or value % mult:
                raise ValueError(
                    f"{_LABELS[fname]} = {short_repr(value)} is not allowed for {self.label}: use a multiple of {mult} from {lo} to {hi}"
                )
            checked[fname] = value
        if num_frames is not None:
            lo, hi, rule = lim["num_frames"]
            num_frames = _need_int("Frames", num_frames)
            if not lo <= num_frames <= hi or not frames_rule_ok(num_frames, rule):
                allowed = f"exactly {lo}" if lo == hi else f"{_rule_text(rule)} from {lo} to {hi}"
                raise ValueError(f"Frames = {short_repr(num_frames)} is not allowed for {self.label}: use {allowed}")
            checked["num_frames"] = num_frames
        if num_inference_steps is not None:
            lo, hi = lim["num_inference_steps"][:2]
            num_inference_steps = _need_int("Steps", num_inference_steps)
            if not lo <= num_inference_steps <= hi:
                raise ValueError(
                    f"Steps = {short_repr(num_inference_steps)} is outside the allowed range {lo} to {hi} "
                    f"for {self.label}"
                )
            checked["num_inference_steps"] = num_inference_steps
        if guidance_scale is not None:
            lo, hi = lim["guidance_scale"][:2]
            if not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool) or not math.isfinite(guidance_scale):
                raise ValueError(f"Guidance scale must be a finite number, got {short_repr(guidance_scale)}")
            if not lo <= guidance_scale <= hi:
                raise ValueError(
                    f"Guidance scale = {short_repr(guidance_scale)} is outside the allowed range {lo} to {hi} for {self.label}"
                )
            checked["guidance_scale"] = float(guidance_scale)
        if guidance_scale_2 is not None:
            if "guidance_scale_2" not in self.call_defaults():
                raise ValueError(f"{self.label} has one guidance scale; guidance_scale_2 is for two-expert models")
            lo, hi = lim["guidance_scale"][:2]
            if not _is_number(guidance_scale_2) or not lo <= guidance_scale_2 <= hi:
                raise ValueError(f"Guidance scale 2 = {short_repr(guidance_scale_2)} is outside the allowed range {lo} to {hi} "
                                 f"for {self.label}")
            checked["guidance_scale_2"] = float(guidance_scale_2)
        return checked


_REQUEST_FIELDS = ("prompt", "height", "width", "num_frames", "num_inference_steps", "guidance_scale")
# The fields as the app labels them, for messages.
_LABELS = {"height": "Height", "width": "Width"}


def is_profile_file(profile: Any) -> bool:
    """Whether a `profile` names a profile file (a path ending in .json) rather than one of a preset's profiles."""
    return _profile_files().is_profile_path(profile)


def _profile_files():
    # Imported when used: the profile-file format lives with the calibration, which imports the runner (and this).
    from .calibrate import profile

    return profile


def size_class(height: int, width: int, names=tuple(SIZE_CLASSES)) -> str:
    """The size class among `names` whose pixel count is nearest `height` × `width`'s, by ratio."""
    pixels = height * width
    return min(names, key=lambda n: abs(math.log(pixels / (SIZE_CLASSES[n][0] * SIZE_CLASSES[n][1]))))


def _need_int(fname: str, value: Any) -> int:
    # UI sliders may deliver whole floats (480.0): accept those, never truncate 480.5.
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{fname} must be a whole number, got {short_repr(value)}")


def _check_schema(data: Any, source: str, settings: Settings) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"{source}: {msg}")

    if not isinstance(data, Mapping):
        fail("a preset must be a JSON object")
    for key in _TOP_KEYS:
        if key not in data:
            fail(f"missing key {key!r}")
        if data[key] is None and key not in _NULLABLE_TOP:
            fail(f"key {key!r} must not be null")
    for key in ("name", "label", "kind", "dtype", "notes"):
        if not isinstance(data[key], str):
            fail(f"key {key!r} must be a string")
    if data["dtype"] not in DTYPE_NAMES:
        fail(f"dtype {data['dtype']!r} must be one of {', '.join(DTYPE_NAMES)}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", data["name"]):
        fail(f"name {data['name']!r} must be lower-case letters, digits, '.', '_' or '-'")
    for key in ("hub_id", "pipeline_class"):
        if data[key] is not None and not isinstance(data[key], str):
            fail(f"key {key!r} must be a string or null")
    mem = data["recommended_gpu_memory_gb"]
    if mem is not None and (not _is_number(mem) or mem < 0):
        fail("recommended_gpu_memory_gb must be a number >= 0 or null")

    for section, keys in (("defaults", _DEFAULT_KEYS), ("limits", _LIMIT_KEYS), ("bwcache", ())):
        sec = data[section]
        if not isinstance(sec, Mapping):
            fail(f"{section!r} must be an object")
        for key in keys:
            if key not in sec:
                fail(f"missing key {section}.{key}")

    d = data["defaults"]
    for key in ("prompt", "negative_prompt"):
        if not isinstance(d[key], str):
            fail(f"defaults.{key} must be a string")
    for key in ("height", "width", "num_frames", "num_inference_steps", "seed"):
        if not _is_int(d[key]):
            fail(f"defaults.{key} must be an integer")
    for key in ("guidance_scale", "fps"):
        if not _is_number(d[key]) or d[key] < 0:
            fail(f"defaults.{key} must be a number >= 0")
    if d["fps"] <= 0:
        fail("defaults.fps must be positive")

    lim = data["limits"]
    for key in ("height", "width"):
        v = lim[key]
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_int(x) for x in v) and 1 <= v[0] <= v[1] and v[2] >= 1):
            fail(f"limits.{key} must be [min, max, multiple] integers with 1 <= min <= max")
    v = lim["num_frames"]
    if not (isinstance(v, (list, tuple)) and len(v) == 3 and _is_int(v[0]) and _is_int(v[1]) and 1 <= v[0] <= v[1]):
        fail("limits.num_frames must be [min, max, rule] with integers 1 <= min <= max")
    try:
        _parse_rule(v[2])
    except ValueError as exc:
        fail(f"limits.num_frames: {exc}")
    v = lim["num_inference_steps"]
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) for x in v) and 1 <= v[0] <= v[1]):
        fail("limits.num_inference_steps must be [min, max] integers with 1 <= min <= max")
    v = lim["guidance_scale"]
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v) and v[0] <= v[1]):
        fail("limits.guidance_scale must be [min, max] numbers with min <= max")
    if not _is_int(lim["prompt_max_chars"]) or lim["prompt_max_chars"] < 1:
        fail("limits.prompt_max_chars must be an integer >= 1")

    b = data["bwcache"]
    # The cache settings check themselves (names, allowed ranges); a preset may set those a model has defaults for.
    allowed = settings.preset_names

    def check_cache(values: Mapping, where: str) -> None:
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            fail(f"{where}unknown bwcache key(s) {unknown}; allowed: {list(allowed)}")
        try:
            settings.make({k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})
        except ValueError as exc:
            fail(f"{where or 'bwcache: '}{exc}")

    check_cache(b, "")
    profiles = data.get("profiles", {})
    if not isinstance(profiles, Mapping):
        fail("'profiles' must be an object")
    for name, profile in profiles.items():
        if name == DEFAULT_PROFILE or not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            fail(f"profile name {name!r} must be lower-case letters, digits or '-', and not {DEFAULT_PROFILE!r}")
        if not isinstance(profile, Mapping) or set(profile) != {"note", "bwcache"}:
            fail(f"profiles.{name} must be an object with exactly the keys 'note' and 'bwcache'")
        if not isinstance(profile["note"], str) or not isinstance(profile["bwcache"], Mapping):
            fail(f"profiles.{name}: 'note' must be a string and 'bwcache' an object")
        unknown = sorted(set(profile["bwcache"]) - set(allowed))
        if unknown:
            fail(f"profiles.{name}: unknown bwcache key(s) {unknown}")
        check_cache({**b, **profile["bwcache"]}, f"profiles.{name}: ")
    _check_loading(data.get("loading", {}), data, fail)
    _check_model(data.get("model", {}), fail)
    if data.get("image") not in (None, *IMAGE_INPUTS):
        fail(f"image must be null or one of {list(IMAGE_INPUTS)}, got {data.get('image')!r}")


_MODEL_KEYS = {"transformer_class": str, "transformer": Mapping, "experts": int, "vae_compression": (list, tuple),
               "text_tokens": int, "cfg": str, "components": Mapping}
_MODEL_REQUIRED = ("transformer_class", "transformer", "vae_compression", "text_tokens", "cfg")
CFG_LAYOUTS = ("separate", "batched", "none")


def _check_model(model: Any, fail) -> None:
    if not isinstance(model, Mapping):
        fail("'model' must be an object")
    if not model:
        return
    unknown = sorted(set(model) - set(_MODEL_KEYS))
    if unknown:
        fail(f"unknown model key(s) {unknown}; allowed: {sorted(_MODEL_KEYS)}")
    for key in _MODEL_REQUIRED:
        if key not in model:
            fail(f"missing key model.{key}")
    for key, kind in _MODEL_KEYS.items():
        if key in model and (not isinstance(model[key], kind) or isinstance(model[key], bool)):
            fail(f"model.{key} has the wrong type")
    compression = model["vae_compression"]
    if len(compression) != 2 or not all(_is_int(v) and v >= 1 for v in compression):
        fail("model.vae_compression must be [temporal, spatial] integers >= 1")
    if model["cfg"] not in CFG_LAYOUTS:
        fail(f"model.cfg must be one of {list(CFG_LAYOUTS)}, got {model['cfg']!r}")
    if model.get("experts", 1) not in (1, 2):
        fail("model.experts must be 1 or 2")
    for name, count in model.get("components", {}).items():
        if not _is_number(count) or count <= 0:
            fail(f"model.components.{name} must be a parameter count > 0")


def _check_loading(loading: Any, data: Mapping, fail) -> None:
    if not isinstance(loading, Mapping):
        fail("'loading' must be an object")
    unknown = sorted(set(loading) - set(_LOADING_KEYS))
    if unknown:
        fail(f"unknown loading key(s) {unknown}; allowed: {list(_LOADING_KEYS)}")
    dtypes = loading.get("component_dtypes", {})
    if not isinstance(dtypes, Mapping):
        fail("loading.component_dtypes must be an object of component name -> dtype")
    for component, dtype in dtypes.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", component) or component == "default":
            fail(f"loading.component_dtypes: {component!r} is not a component name (such as 'vae' or 'transformer')")
        if dtype not in DTYPE_NAMES:
            fail(f"loading.component_dtypes.{component} must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    shift = loading.get("flow_shift")
    if shift is not None:
        values = shift.items() if isinstance(shift, Mapping) else [(None, shift)]
        if isinstance(shift, Mapping) and not shift:
            fail("loading.flow_shift must name at least one size class")
        for size, value in values:
            where = "loading.flow_shift" + (f".{size}" if size is not None else "")
            if size is not None and size not in SIZE_CLASSES:
                fail(f"{where}: unknown size class; use one of {', '.join(SIZE_CLASSES)}")
            if not _is_number(value) or value <= 0:
                fail(f"{where} must be a number > 0 (or an object of size class -> number), got {value!r}")
    if "vae_tiling" in loading and not isinstance(loading["vae_tiling"], bool):
        fail("loading.vae_tiling must be true or false")
    offload = loading.get("cpu_offload")
    if offload is not None and offload not in CPU_OFFLOAD_MODES:
        fail(f"loading.cpu_offload must be null or one of {list(CPU_OFFLOAD_MODES)}, got {offload!r}")
    extras = loading.get("call_defaults", {})
    if not isinstance(extras, Mapping):
        fail("loading.call_defaults must be an object")
    unknown = sorted(set(extras) - set(CALL_DEFAULTS))
    if unknown:
        fail(f"unknown loading.call_defaults key(s) {unknown}; allowed: {list(CALL_DEFAULTS)}")
    if "guidance_scale_2" in extras:
        lo, hi = data["limits"]["guidance_scale"][:2]
        value = extras["guidance_scale_2"]
        if not _is_number(value) or not lo <= value <= hi:
            fail(f"loading.call_defaults.guidance_scale_2 must be a number from {lo} to {hi} "
                 f"(limits.guidance_scale), got {value!r}")
    image_class = loading.get("image_pipeline_class")
    if image_class is not None:
        if not isinstance(image_class, str) or not re.fullmatch(r"[A-Z][A-Za-z0-9]*Pipeline", image_class):
            fail(f"loading.image_pipeline_class must name a diffusers pipeline class (such as "
                 f"'WanImageToVideoPipeline'), got {image_class!r}")
        if data.get("image") != "optional":
            fail("loading.image_pipeline_class is for presets whose image is \"optional\" (the pipeline_class "
                 f"runs without one); this preset's image is {data.get('image')!r}")


def _read(path: Path, settings: Settings = CACHE_SETTINGS) -> Preset:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return Preset.from_dict(data, source=str(path), path=path, settings=settings)


def _preset_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


def _sort_key(p: Preset) -> tuple[bool, str]:
    return (p.name != FIRST_PRESET, p.name)


def list_presets(directory: str | Path | None = None) -> list[Preset]:
    """Every preset in ``directory`` (default ``PRESETS_DIR``), sorted by name with tiny-shapes first."""
    directory = PRESETS_DIR if directory is None else Path(directory)
    return sorted((_read(p) for p in _preset_files(directory)), key=_sort_key)


def preset_names(directory: str | Path | None = None) -> list[str]:
    """Names of the presets in ``list_presets`` order."""
    return [p.name for p in list_presets(directory)]


def load_preset(name_or_path: str | Path, directory: str | Path | None = None,
                settings: Settings = CACHE_SETTINGS) -> Preset:
    """A preset by name (``presets/<name>.json``, or any preset whose ``name`` matches)
    or by path to a JSON file, checked against `settings`. Unknown names raise ValueError listing the available
    ones."""
    directory = PRESETS_DIR if directory is None else Path(directory)
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" or candidate.parent != Path("."):
        if not candidate.is_file():
            raise ValueError(f"preset file not found: {candidate}")
        return _read(candidate, settings)
    name = str(name_or_path)
    direct = directory / f"{name}.json"
    if direct.is_file():
        return _read(direct, settings)
    presets = list_presets(directory)
    for p in presets:
        if p.name == name:
            return p
    available = ", ".join(p.name for p in presets) or "none"
    raise ValueError(f"unknown preset {name!r}; available presets: {available}")
