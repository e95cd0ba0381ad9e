"""Files in, files out: decoding images and DICOM into ``Frame``s, and writing results atomically.

Nothing here imports a model or a backend; ``frames.py`` is the whole contract with the pipeline.
"""
