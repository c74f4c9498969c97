"""Masks from intent: a library of MAISI label maps, selection by region/anatomy/size, tumour editing.

- `tumors`: add / remove / scale / augment tumours on any label map (pure functions over arrays).
"""
