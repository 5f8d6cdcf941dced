"""``python -m lightning_geomarkers``: the command line (same as the ``lightning-geomarkers`` script)."""

from lightning_geomarkers.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
