"""Calibrate BWCache to a target on a user's own pipeline: `calibrate(pipe, prompts, target_psnr=...)` or
`calibrate_preset("tiny-shapes", target_speedup=...)`, and the profile files a calibration saves
(`bwcache.calibrate.profile`), which load wherever a preset's built-in profiles do.

    >>> from bwcache import calibrate
    >>> result = calibrate(pipe, ["a red square moving right"], target_psnr=35, num_inference_steps=30)
    >>> print(result.summary())
    >>> result.save("my-profile.json")

The calibration itself (`core`) imports the runner, which reads profile files (`profile`): it is imported when first
used, so that reading a profile never loads it.
"""

from .profile import ProfileFile, ProfileMismatchWarning, is_profile_path, read_profile

_LAZY = {
    "Calibration": "core",
    "calibrate": "core",
    "check_targets": "core",
    "DEFAULT_BUDGET": "core",
    "calibrate_preset": "for_preset",
    "calibration_prompts": "for_preset",
}

__all__ = ["Calibration", "ProfileFile", "ProfileMismatchWarning", "calibrate", "calibrate_preset",
           "calibration_prompts", "check_targets", "is_profile_path", "read_profile", "DEFAULT_BUDGET"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
