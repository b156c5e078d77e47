from nanosae.cli import main

main()
