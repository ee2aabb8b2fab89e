"""The original modelscape's own pieces that are not the library's way: its model classes and
centering wrapper (``model``) and its array, seeding and config helpers (``utils``).

Its entry points stay where its scripts import them: ``modelscape.backend.cli`` and
``modelscape.backend.job_iterator``, and ``modelscape.model``.
"""
