"""The README's first screen says what the bundled encoder knows, and where real archives go."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_first_screen_says_the_bundled_encoder_knows_digits_only_and_points_to_adapters():
    first_screen = "\n".join(README.read_text().splitlines()[:30]).lower()
    assert "only knows digits" in first_screen or "digits only" in first_screen
    for what in ("spoken digits", "handwritten digit", "digit captions"):
        assert what in first_screen, what
    assert "hf_clip" in first_screen and "#the-learned-encoders" in first_screen
