"""Run the benchmarks (all, or those named) and print their figures as Markdown."""

import sys

from . import callbacks, control, fidelity, lists, memory, scale, soak, spool, startup

BENCHMARKS = {
    "fidelity": fidelity,
    "callbacks": callbacks,
    "memory": memory,
    "lists": lists,
    "spool": spool,
    "scale": scale,
    "startup": startup,
    "soak": soak,
    "control": control,
}


def main(names: list[str]) -> None:
    for name in names or BENCHMARKS:
        print("\n".join(BENCHMARKS[name].run()), flush=True)
        print()


main(sys.argv[1:])
