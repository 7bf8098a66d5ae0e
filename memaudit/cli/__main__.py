"""``python -m memaudit.cli``: the same as the ``memaudit`` command."""

from memaudit.cli.app import main

if __name__ == "__main__":
    main()
