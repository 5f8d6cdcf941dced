"""``python -m lightning_geomarkers.cli``: the command line (same as ``python -m lightning_geomarkers``)."""

from lightning_geomarkers.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
