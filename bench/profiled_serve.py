"""Run `python cli.py serve ...` under cProfile, switched on by SIGUSR1 and written out by SIGUSR2, so that
a benchmark profiles the load window only. For bench/http_sign.py --profile; one worker.

    python bench/profiled_serve.py PROFILE_FILE serve --port ...
"""

import cProfile
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    profiler = cProfile.Profile()
    signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())

    def dump(*_: object) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR2, dump)
    sys.exit(cli.main(argv))


if __name__ == "__main__":
    main()
