"""contlearn's built-in strategies, one module each, registered by short name
in :data:`contlearn._registry.BUILTIN_PLUGINS` exactly as a third-party plugin
would be through an entry point."""
