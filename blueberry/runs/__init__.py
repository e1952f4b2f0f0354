"""Run directories: the one place that lays them out, writes their checkpoints and loads them back.

    layout.py        the files of a run directory, the default name, the checks before a new run writes
    checkpoint.py    atomic checkpoints (single-file and sharded), `latest`/`best`, resolving a run spec
    dcp_reader.py    reading sharded (DCP) checkpoints at any world size, without running code
    ensemble_dir.py  an ensemble run's members
    loading.py       `load_model`: any run (plain, SFT, imported, quantized, ensemble, sharded) for use
    quantized.py     writing a quantized run

Training writes runs through it; inference, evaluation, export and the CLI read them only through it.
"""
