"""KServe v2 load generator (rnndeploy.bench.load): the same as `python -m rnndeploy.bench.load`.

python benchmarks/kserve_load.py --port 8000 --model lm --sequences 64 --steps 50 [--client tritonclient]
"""

from rnndeploy.bench.load import main

if __name__ == "__main__":
    main()
