from rnndeploy.cli import main

main()
