"""Small pure helpers shared by packages on different layers (``rewards/`` and ``eval/`` both use them).

They import nothing from ``diffalign``, so any package may import them without importing upwards."""
