"""What users type is refused loudly where the model could not follow it: prompts the Tiny Shapes encoder cannot
read (instead of their words vanishing), negative prompts named as such, and over-long negative prompts."""

from __future__ import annotations

import pytest

from bwcache import ui
from bwcache.presets import load_preset
from bwcache.tiny import load_pipeline


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.mark.parametrize(
    ("prompt", "negative", "message"),
    [
        ("!!! ???", "", "prompt has no word the Tiny Shapes model knows"),
        ("a red square 🙂 moving right", "", "prompt contains characters the Tiny Shapes text encoder cannot read: 🙂"),
        ("红色方块", "", "prompt contains characters the Tiny Shapes text encoder cannot read"),
        ("a red square moving right", "blurry", "negative prompt contains words outside the Tiny Shapes vocabulary: blurry"),
        ("a red square moving right", "???", "negative prompt has no word the Tiny Shapes model knows"),
    ],
)
def test_unreadable_prompts_are_refused_by_name(pipe, prompt, negative, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")) as excinfo:
        pipe.encode_prompt(prompt, negative, True)
    assert prompt not in str(excinfo.value) or prompt == "a red square moving right"


def test_a_long_unknown_word_is_not_echoed_in_full(pipe):
    with pytest.raises(ValueError) as excinfo:
        pipe.encode_prompt("a red square moving right", "x" * 5000, True)
    assert len(str(excinfo.value)) < 300 and "negative prompt" in str(excinfo.value)


def test_an_empty_negative_prompt_is_the_unconditional_input(pipe):
    prompt_embeds, negative_embeds = pipe.encode_prompt("a red square moving right", "", True)
    assert negative_embeds.shape == prompt_embeds.shape


def test_a_negative_prompt_has_a_length_limit():
    preset = load_preset("tiny-shapes")
    limit = ui.NEGATIVE_PROMPT_MAX_CHARS
    ui.check_request(preset, negative_prompt="a " * (limit // 2))
    with pytest.raises(ValueError, match=f"negative prompt is {limit + 1} characters long; at most {limit}"):
        ui.check_request(preset, negative_prompt="a" * (limit + 1))
