"""Fake experts for the Ray engine's tests, importable on Ray workers (tests/ is on their PYTHONPATH).

Answers report a fixed latency, so two runs of the same inputs write the same bytes.
"""

import asyncio
import os


def _log(log, tag, prompt):
    # Logged when the call starts: a call killed before its commit shows up in both runs.
    if log:
        with open(log, "a") as handle:
            handle.write(f"{tag}\t{prompt}\n")


async def answer(prompt, tag, delay=0.0, log=None):
    _log(log, tag, prompt)
    await asyncio.sleep(delay)
    return {"text": f"{tag}: {prompt}", "input_tokens": 4, "output_tokens": 2, "latency_s": 0.0}


async def echo(prompt, tag):
    """The prompt itself, so the exact-match score is 1."""
    return {"text": prompt, "input_tokens": 3, "output_tokens": 3, "latency_s": 0.0}


def broken(prompt, tag):
    raise ValueError(f"{tag} cannot answer")


def crash_once(prompt, tag, marker):
    """Kills its worker process the first time any call is made (the marker file says it happened)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return {"text": f"{tag}: {prompt}", "input_tokens": 1, "output_tokens": 1, "latency_s": 0.0}
    os.close(fd)
    os._exit(1)
