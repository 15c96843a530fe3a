"""The progress callback of every long library call (pack, synthetic models, eval):

    progress(done, total, what)

`done` of `total` units are finished, `what` names the current one (a tensor, a task); the first
call may carry done = 0. The CLI draws a rich bar from it; a library user can pass any callable.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[int, int, str], None]
