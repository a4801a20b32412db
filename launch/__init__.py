"""The command-line entry points (``python launch/<stage>.py``); installed as ``dist_kd.launch`` and run by
the ``dist-kd <stage>`` console command."""
