"""Run configs shipped with dist_kd (installed as ``dist_kd.launch.configs``)."""
