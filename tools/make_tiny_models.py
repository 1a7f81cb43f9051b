"""Build the tiny random models that tests and `zoom demo` use, into a folder (default: the cache).

    python tools/make_tiny_models.py [--out DIR]

Prints the folders: sd (diffusers pipeline), guide and judge (open_clip local-dir), target
(transformers image classifier). Building is deterministic (fixed seeds) and skipped when done.
"""

import argparse

from zoom.tiny import build_tiny_models, default_cache_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"folder to build into (default: {default_cache_dir()})")
    args = parser.parse_args()
    for name, path in build_tiny_models(args.out).items():
        print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
