"""Run the benchmarks (all, or those named) and print their figures as Markdown."""

import sys

from . import (
    callbacks,
    cluster,
    control,
    fidelity,
    lists,
    memory,
    pg_driver,
    scale,
    soak,
    spool,
    startup,
)

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
    "pg_driver": pg_driver,
    "cluster": cluster,
}


def main(names: list[str]) -> None:
    for name in names or BENCHMARKS:
        print("\n".join(BENCHMARKS[name].run()), flush=True)
        print()


main(sys.argv[1:])
