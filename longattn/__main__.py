from longattn.cli.select import main

main()
