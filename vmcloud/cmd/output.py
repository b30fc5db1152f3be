"""Printing results as tables or JSON, and progress bars on long work."""
import json
import sys
import time
from typing import Any, Sequence, TextIO


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str,
         stream: TextIO | None = None) -> None:
    """Print ``rows`` as a table with ``columns``, or as a JSON list, on ``stream``
    (default: sys.stdout as it is at the call, which a caller may have redirected)."""
    stream = stream or sys.stdout
    if fmt == 'json':
        json.dump(list(rows), stream, indent=2, default=str)
        stream.write('\n')
        return
    cells = [[str(row.get(c, '')) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = '+' + '+'.join('-' * (w + 2) for w in widths) + '+'
    print(line, file=stream)
    print('| ' + ' | '.join(c.ljust(w) for c, w in zip(columns, widths)) + ' |', file=stream)
    print(line, file=stream)
    for row in cells:
        print('| ' + ' | '.join(v.ljust(w) for v, w in zip(row, widths)) + ' |', file=stream)
    print(line, file=stream)


def emit_record(record: dict[str, Any], fmt: str, stream: TextIO | None = None) -> None:
    """Print one object as a field/value table, or as a JSON object (``stream`` as for
    ``emit``)."""
    stream = stream or sys.stdout
    if fmt == 'json':
        json.dump(record, stream, indent=2, default=str)
        stream.write('\n')
        return
    emit([{'field': k, 'value': v} for k, v in record.items()], ('field', 'value'), fmt, stream)


def human_bytes(n: float) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if abs(n) < 1024 or unit == 'TiB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024
    raise AssertionError('unreachable')


class ProgressBar:
    """A one-line progress bar on a terminal; silent when the stream is not a terminal."""

    WIDTH = 30

    def __init__(self, label: str, unit: str = 'bytes', stream: TextIO | None = None,
                 enabled: bool | None = None):
        """``stream``: by default sys.stderr as it is now."""
        self.label = label
        self.unit = unit
        self.stream = stream = stream or sys.stderr
        self.enabled = stream.isatty() if enabled is None else enabled
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        fraction = done / total if total else 1.0
        filled = int(self.WIDTH * fraction)
        amount = (f'{human_bytes(done)}/{human_bytes(total)}' if self.unit == 'bytes'
                  else f'{done}/{total} {self.unit}')
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                          f'{fraction:4.0%} {amount}   ')
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write('\n')
            self.stream.flush()
