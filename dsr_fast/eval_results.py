"""The evaluation's results file (JSONL) and the Pass@1 table made from it.

Layout: the first line holds the settings that decide what gets generated; then one line per
finished problem, appended (and flushed) as soon as its samples are generated and graded::

    {"format": "dsr_fast.eval/1", "settings": {"model": ..., "samples": 16, "temperature": 0.6, ...}}
    {"dataset": "aime", "file": ..., "index": 0, "problem": ..., "answer": ..., "pass_at_1": 0.25,
     "samples": [{"score": 1.0, "status": "graded", "extracted": "204", "finish_reason": "stop",
                  "num_tokens": 5120, "text": "..."}, ...]}

Resuming: reopening the file with the same settings keeps its records, so those problems are
not generated again; different settings are an error (the records would mix two setups).
The data files and how many problems of each are evaluated may change between runs.  A last
line cut short by a kill is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError

FORMAT = "dsr_fast.eval/1"

# Column names of the DeepScaleR README table (recipe.md section 5.1) for its test files.
# amc.json (AMC 12 2022-2023, 83 problems) is what the README reports as "AMC23".
PAPER_NAMES = {
    "aime": "AIME24",
    "math": "MATH500",
    "amc": "AMC23",
    "minerva": "Minerva",
    "olympiad_bench": "OlympiadBench",
    "aime25": "AIME25",
}


class ResultsFile:
    """Finished problems of one evaluation, on disk; ``records`` maps (dataset, index) to a record."""

    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.settings = settings
        self.records: dict[tuple[str, int], dict] = {}
        if self.path.is_dir():
            raise InputError(f"{self.path}: --out is a directory, expected a .jsonl file")
        self._file = None  # opened at the first record, so a run that fails earlier leaves no file
        self._has_settings_line = False
        if self.path.exists() and self.path.stat().st_size > 0:
            self._resume()
            self._has_settings_line = True

    def add(self, record: dict) -> None:
        """Store a finished problem (written to disk before this returns)."""
        if self._file is None:
            self._open_for_appending()
        self.records[(record["dataset"], record["index"])] = record
        self._append(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _open_for_appending(self) -> None:
        if self._has_settings_line:
            self._file = open(self.path, "a", encoding="utf-8")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        self._append({"format": FORMAT, "settings": self.settings})

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _append(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def _resume(self) -> None:
        data = self.path.read_bytes()
        complete_end = data.rfind(b"\n") + 1
        lines = data[:complete_end].decode("utf-8", errors="replace").splitlines()
        if not lines:
            raise InputError(f"{self.path}: not a results file of dsr_fast.eval (no settings line); use another --out")
        header = _parse_line(self.path, 1, lines[0])
        if header.get("format") != FORMAT or not isinstance(header.get("settings"), dict):
            raise InputError(f"{self.path}: not a results file of dsr_fast.eval (first line has no {FORMAT!r} settings); use another --out")
        self._check_settings(header["settings"])
        for lineno, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            record = _parse_line(self.path, lineno, line)
            if not isinstance(record.get("dataset"), str) or not isinstance(record.get("index"), int):
                raise InputError(f"{self.path}:{lineno}: record has no 'dataset'/'index'")
            self.records[(record["dataset"], record["index"])] = record
        if complete_end < len(data):
            # Killed in the middle of writing a record: drop the partial line, keep the rest.
            print(f"{self.path}: dropping an incomplete last line ({len(data) - complete_end} bytes) left by an interrupted run")
            with open(self.path, "r+b") as file:
                file.truncate(complete_end)

    def _check_settings(self, written: dict[str, Any]) -> None:
        differences = [
            f"{key}: {written.get(key)!r} in the file, {value!r} now"
            for key, value in self.settings.items()
            if written.get(key) != value
        ]
        if differences:
            raise InputError(
                f"{self.path} was written with other settings ({'; '.join(differences)}); "
                "rerun with the file's settings to resume it, or choose another --out"
            )


def _parse_line(path: Path, lineno: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}:{lineno}: not valid JSON ({error}); use another --out") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def check_record_matches(results: ResultsFile, record: dict, problem_text: str, answer: Any, source: str) -> None:
    """A kept record must be of the same problem, else the data file changed under the results."""
    if record.get("problem") != problem_text or record.get("answer") != answer:
        raise InputError(
            f"{results.path}: the record of {record['dataset']} problem {record['index']} does not match "
            f"{source} (problem text or answer differ): the data changed since; use another --out"
        )


def format_table(model_name: str, results: dict[str, float]) -> str:
    """A Markdown table like the DeepScaleR README's: Pass@1 in % per dataset, and their mean."""
    names = [PAPER_NAMES.get(name, name) for name in results]
    values = [f"{100 * value:.1f}" for value in results.values()]
    average = f"{100 * sum(results.values()) / len(results):.1f}" if results else "-"
    return "\n".join(
        [
            "| model | " + " | ".join(names) + " | Avg |",
            "|---|" + "---|" * (len(names) + 1),
            f"| {model_name} | " + " | ".join(values) + f" | {average} |",
        ]
    )
