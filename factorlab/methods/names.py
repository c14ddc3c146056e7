"""The registered method names, importable without torch (for the CLI's help and choices).
``factorlab.methods.registry`` refuses to register a method missing here."""

METHOD_NAMES = (
    "act-svd",
    "autoencoder",
    "block-low-rank",
    "dsformer",
    "fwsvd",
    "low-rank",
    "lpaf",
    "monarch",
)
