"""qo's built-in policy plugins, each registered through the ``qo`` entry-point group."""
