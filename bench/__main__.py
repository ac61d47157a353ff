"""Run every benchmark and print its figures as Markdown."""

from . import fidelity


def main() -> None:
    for benchmark in (fidelity,):
        print("\n".join(benchmark.run()), flush=True)
        print()


main()
