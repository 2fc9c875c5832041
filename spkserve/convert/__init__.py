"""Import steps that read other codes' model files and write bundles.

The only place in the runtime that reads pickles, and only through the
restricted unpickler of :mod:`spkserve.convert.torch_pickle`.
"""
