from longattn.cli.train import main

main()
