"""Shipped device profiles: one `<name>.json` per (model, dtype, threads, device), each
measured with `python -m specfed.bench profile` on a quiet machine (see
docs/device-profiles.md). Read them with `specfed.profile.load_profile(name)`."""
