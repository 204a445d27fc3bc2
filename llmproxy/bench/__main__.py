"""``python -m llmproxy.bench``: run the benchmark from the command line."""

from llmproxy.bench import main

if __name__ == "__main__":
    main()
