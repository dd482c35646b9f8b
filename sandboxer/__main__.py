from sandboxer.cli import main

main()
