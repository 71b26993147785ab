from longattn.select import main

main()
