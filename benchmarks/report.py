"""What every benchmark does last: print its table and RESULT line, and append both to RESULTS.md."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def publish(lines: list[str], result: str, target: Path | None) -> None:
    """Print the section and the `RESULT …` line; append them to `target` unless it is None."""
    print("\n".join(lines))
    print(result)
    if target is not None:
        with Path(target).open("a") as f:
            f.write("\n".join(lines) + "\n" + result + "\n\n")
